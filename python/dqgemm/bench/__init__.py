"""The benchmark suite of dqgemm: ``python -m dqgemm bench``.

Modules:
  shapes    layer shape sets (llama3-8b, llama3-70b, quick) and M lists; --shapes parsing
  timing    CUDA-graph and eager timers with cold L2 (rotating weight copies)
  roofline  measured copy bandwidth and matmul peak; the floor time of a case
  peers     the cases that are not dqgemm: FP16/BF16 cuBLAS, torch's INT4 kernel, gemlite
  cases     the dqgemm cases: "auto", each backend, each registered kernel
  runner    builds weights, checks each case against the reference once, times it
  report    tables (full and summary) and the JSON document
  plot      speedup over FP16 against M, with the roofline
  e2e       decode tokens/s of a Llama-shaped transformer with CUDA graphs
  cli       the command line (add_arguments / main)

Nothing here touches CUDA at import time.
"""
