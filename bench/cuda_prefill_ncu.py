"""Runs one cuda_prefill configuration a few times, for Nsight Compute to profile the last.

Usage: ncu --clock-control none -k regex:prefill_gemm --launch-skip 3 --launch-count 1 \\
           --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \\
           python bench/cuda_prefill_ncu.py K N M M_TILE N_TILE K_SPLITS [BITS [WS]]

WS = 1 profiles the warp-specialized variant (a copying warpgroup), 0 (default) the other.
"""

import sys

import torch

import dqgemm
from dqgemm.kernels import cuda_decode as cd
from dqgemm.kernels import cuda_prefill as cp


def main(argv):
    if len(argv) not in (6, 7, 8):
        print(__doc__, file=sys.stderr)
        return 2
    k, n, m, m_tile, n_tile, splits = (int(v) for v in argv[:6])
    bits = int(argv[6]) if len(argv) >= 7 else 4
    ws = len(argv) == 8 and argv[7] == "1"
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.float16) * 0.02
    prep = cd.prepare_decode(dqgemm.quantize(w, bits, 128 if bits == 4 else -1))
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.float16)
    for _ in range(4):
        cp.prefill_matmul(x, prep, None, m_tile=m_tile, k_splits=splits, n_tile=n_tile,
                          warp_specialized=ws)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
