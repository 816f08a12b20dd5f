"""A few cuda_decode launches to profile with Nsight Compute:

    ncu --clock-control none --kernel-name regex:decode_gemm --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section MemoryWorkloadAnalysis python bench/cuda_decode_ncu.py

    python bench/cuda_decode_ncu.py [K N [PRODUCER]]

PRODUCER: "1" forces the copying-warp configuration (producer_warp=True), "0" the others;
default the launch table's choice.

Launch order: INT4 g128 fp16 on K x N (default 8192 x 28672) with M = 1 (3 launches), then M = 16
(3 launches); the command above profiles the 3rd M = 1 and the 1st M = 16 launch.
"""
import torch

import dqgemm
from dqgemm.kernels import cuda_decode as cd

import sys

# optional: K N of the layer (default the Llama-3-70B up-projection)
k, n = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (8192, 28672)
producer = {"1": True, "0": False}[sys.argv[3]] if len(sys.argv) > 3 else None
qw = dqgemm.quantize(torch.randn(n, k, device="cuda") * 0.02, 4, 128)
prep = cd.prepare_decode(qw)
for m in (1, 16):
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    for _ in range(3):
        cd.decode_matmul(x, prep, None, producer_warp=producer)
torch.cuda.synchronize()
print("done")
