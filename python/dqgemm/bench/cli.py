"""`python -m dqgemm bench`: layer benchmark (default) or end-to-end decode (--model).

Examples:
  python -m dqgemm bench --quick                          # CPU: seconds; GPU: ~1 minute
  python -m dqgemm bench --shapes llama3-8b --m 1,16,256 --json out.json --plot out.png
  python -m dqgemm bench --shapes 4096x4096,14336x4096 --bits 4 --backends auto,cuda,fp16
  python -m dqgemm bench --model llama3-8b --batch-sizes 1,8,32 --e2e-backends all
  python -m dqgemm bench --from-json out.json --table summary --plot out.png
Exit status: 0, or 2 when a dqgemm case gave a wrong result (peers' failures are reported
in the table but do not change the status).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Dict

import torch

from . import report, timing
from .shapes import (DEFAULT_M, DEFAULT_SHAPE_SETS, QUICK_M_CPU, QUICK_M_GPU, parse_ints,
                     parse_shapes)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    g = parser.add_argument_group("layer benchmark")
    g.add_argument("--shapes", default=None,
                   help="comma list of KxN and/or sets (llama3-8b, llama3-70b, anchors, "
                        "quick-cpu, quick-gpu); default: llama3-8b,llama3-70b")
    g.add_argument("--m", default=None,
                   help=f"comma list of M (batch rows); default {','.join(map(str, DEFAULT_M))}")
    g.add_argument("--bits", default="4,8", help="comma list of weight bit widths (4, 8)")
    g.add_argument("--group-size", type=int, default=128, help="INT4 group size (default 128)")
    g.add_argument("--int8-group-size", type=int, default=-1,
                   help="INT8 group size (default -1: one scale per output channel)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                   help="activation dtype of the dqgemm cases (default fp16)")
    g.add_argument("--backends", default="all",
                   help="comma list: all, peers, dqgemm, kernels, torch_fp16, torch_bf16, "
                        "torch_int4, gemlite, auto, reference, triton, cuda, or kernel names "
                        "(torch_fp16 is always timed: it is the baseline)")
    g.add_argument("--quick", action="store_true",
                   help="small subset: CPU shapes on a CPU (seconds), two shapes x 3 M on a GPU")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--reps", type=int, default=None,
                   help=f"timed replays per case (median; default {timing.MIN_REPS}, the minimum "
                        f"for published numbers; 5 for --quick on a CPU)")
    g.add_argument("--warmup", type=int, default=3, help="graph replays before timing")
    g.add_argument("--no-rotate", action="store_true",
                   help="one weight copy (warm L2; not for published numbers)")
    g.add_argument("--no-graphs", action="store_true", help="time eagerly only")
    g.add_argument("--reference-max-kn", type=int, default=4096 * 4096,
                   help="time the (slow) reference backend on the GPU only up to this K*N")
    g.add_argument("--reference-max-m", type=int, default=1024,
                   help="... and up to this M")
    o = parser.add_argument_group("output")
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop timing new cases after this long; the rest is listed as not run "
                        "and the JSON is still written")
    o.add_argument("--json", default=None, metavar="PATH", help="write the results document")
    o.add_argument("--plot", default=None, metavar="PATH.png",
                   help="speedup over FP16 vs M per shape, with the roofline")
    o.add_argument("--table", choices=("full", "summary", "both", "none"), default="both",
                   help="what to print (default: full table, then the summary)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--resume", default=None, metavar="PATH",
                   help="continue an aborted run (a CUDA error broke its context) from its "
                        "JSON: keeps its cases, skips the kernel that broke it")
    o.add_argument("--from-json", default=None, metavar="PATH",
                   help="print tables / plot from a saved document; measures nothing")
    e = parser.add_argument_group("end-to-end decode (--model)")
    e.add_argument("--model", default=None,
                   help="llama3-8b, llama3-70b or tiny: decode tokens/s instead of layers")
    e.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes")
    e.add_argument("--variants", default="fp16,int4,int8", help="fp16, int4, int8")
    e.add_argument("--e2e-backends", default="all",
                   help="dqgemm backend(s) of the quantized variants: all (default: every "
                        "backend with a usable kernel here, reference excluded; 'auto' "
                        "dispatches among them), auto, or a comma list")
    e.add_argument("--layers", type=int, default=None,
                   help="decoder layers to build (default: the model's; reported as used)")
    e.add_argument("--context", type=int, default=256, help="KV positions before decoding")
    e.add_argument("--steps", type=int, default=32, help="timed decode steps")
    e.add_argument("--elementwise", default=None, choices=("triton", "torch"),
                   help="norms, RoPE, KV writes, attention, SiLU: fused Triton kernels "
                        "(default on CUDA) or plain torch ops (default elsewhere); same for "
                        "every variant")
    e.add_argument("--programmatic-launch", default=None, choices=("on", "off"),
                   help="run each step within dqgemm.programmatic_launch() (default: on "
                        "with the Triton ops on compute capability 9.0+)")


def _device(args) -> torch.device:
    if args.device:
        dev = torch.device(args.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: expected an available device, got cuda (torch sees none)")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _emit(doc: Dict, args) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot and doc.get("results"):
        from .plot import plot
        plot(doc, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.table in ("full", "both") and doc.get("results"):
        print(report.full_table(doc))
        print()
    if args.table in ("summary", "both") and doc.get("results"):
        print(report.summary_table(doc))
    if doc.get("e2e"):
        from .e2e import format_results
        print(format_results(doc["e2e"]))


def _status(doc: Dict) -> int:
    bad = [r for r in doc.get("results", []) if r.get("family") == "dqgemm" and not r["ok"]]
    bad += [r for r in doc.get("e2e", []) if r.get("variant") != "fp16" and not r["ok"]]
    if bad or doc.get("aborted"):
        print(f"{len(bad)} dqgemm case(s) NOT OK" +
              (f"; run aborted: {doc['aborted']}" if doc.get("aborted") else ""),
              file=sys.stderr)
        return 2
    return 0


def main(args) -> int:
    try:
        return _main(args)
    except ValueError as exc:          # a bad option: say which, no traceback
        print(f"dqgemm bench: error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    from . import runner
    from .cases import QuantSettings, backend_tokens

    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
        args.json = None
        _emit(doc, args)
        return 0

    device = _device(args)
    command = "python -m dqgemm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0] else ""
    if args.model:
        from . import e2e
        if device.type != "cuda" and args.model != "tiny" and args.layers is None:
            raise ValueError(f"model: {args.model!r} at full size needs a CUDA GPU (this run is "
                             f"on {device.type}); on a CPU use --model tiny or set --layers")
        results = e2e.run_decode_benchmark(
            model=args.model, batch_sizes=parse_ints(args.batch_sizes, "batch_sizes"),
            variants=[v.strip() for v in args.variants.split(",") if v.strip()],
            backend=args.e2e_backends, device=str(device), progress=not args.no_progress,
            layers=args.layers, context=args.context, steps=args.steps,
            group_size=args.group_size, use_graph=not args.no_graphs,
            elementwise=args.elementwise,
            programmatic_launch=(None if args.programmatic_launch is None
                                 else args.programmatic_launch == "on"))
        doc = {"schema": runner.SCHEMA, "command": command,
               "device": runner.device_facts(device), "versions": runner.versions(),
               "results": [], "e2e": results}
        _emit(doc, args)
        return _status(doc)

    on_gpu = device.type == "cuda"
    reps = args.reps if args.reps is not None else (
        5 if args.quick and not on_gpu else timing.MIN_REPS)
    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    elif args.quick:
        shapes = parse_shapes("quick-gpu" if on_gpu else "quick-cpu")
    else:
        shapes = parse_shapes(",".join(DEFAULT_SHAPE_SETS))
    if args.m:
        ms = parse_ints(args.m, "m")
    else:
        ms = list(QUICK_M_GPU if on_gpu else QUICK_M_CPU) if args.quick else list(DEFAULT_M)
    bits = parse_ints(args.bits, "bits")
    for b in bits:
        if b not in (4, 8):
            raise ValueError(f"bits: expected 4 and/or 8, got {b}")
    resume = None
    if args.resume:
        with open(args.resume) as f:
            resume = json.load(f)
    settings = runner.Settings(
        shapes=shapes, ms=ms, bits=bits, dtype=DTYPES[args.dtype],
        quant=QuantSettings(group_size_int4=args.group_size,
                            group_size_int8=args.int8_group_size),
        backends=backend_tokens(args.backends), device=device, reps=reps,
        warmup=args.warmup, rotate=not args.no_rotate, graphs=not args.no_graphs,
        reference_max_kn=args.reference_max_kn, reference_max_m=args.reference_max_m,
        progress=not args.no_progress, command=command, resume=resume,
        time_budget_s=args.time_budget)
    doc = runner.run(settings)
    _emit(doc, args)
    return _status(doc)
