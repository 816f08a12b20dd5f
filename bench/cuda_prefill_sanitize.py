"""Small sweep of every cuda_prefill launch configuration, for compute-sanitizer.

Runs each (m_tile, n_tile, warp_specialized, k_splits or stream-K) on small odd shapes
(stream-K over 7 blocks, so that blocks span several tiles), both widths
and dtypes, symmetric / zero points / offsets, and checks each result against the
float64 reference; prints one line per case and a final "N/N within tolerance".

Usage: compute-sanitizer --tool memcheck python bench/cuda_prefill_sanitize.py
       compute-sanitizer --tool racecheck python bench/cuda_prefill_sanitize.py --quick
"""

import sys

import torch

import dqgemm
from dqgemm.bench.runner import TOLERANCE
from dqgemm.kernels import cuda_decode as cd
from dqgemm.kernels import cuda_prefill as cp


def main(argv):
    quick = "--quick" in argv
    gen = torch.Generator().manual_seed(0)
    cases = ok = 0
    choices = cp.all_choices(3)
    if quick:
        choices = [c for c in choices if c.k_splits in (1, 3)]
    # K = 1152 (9 x 128) and 704 (5.5 x 128: a padded last stage); N = 200: 1.5 n_tiles
    for bits, dtype, mode, group, k in ((4, torch.float16, "symmetric", 128, 1152),
                                        (8, torch.bfloat16, "zero_points", -1, 704),
                                        (4, torch.bfloat16, "offsets", 32, 704)):
        n = 200
        w = torch.randn(n, k, generator=gen) * 0.02
        qw = dqgemm.quantize(w.cuda(), bits, group, symmetric=mode != "zero_points")
        if mode == "offsets":
            qw = qw.replace(offsets=(torch.randn(n, qw.num_groups, generator=gen) * 0.01)
                            .half().cuda())
        prep = cd.prepare_decode(qw)
        ref_w = qw.dequantize(torch.float64)
        for choice in choices:
            m = choice.m_tile + 5
            x = torch.randn(m, k, generator=gen).to(dtype).cuda()
            out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            cp.prefill_matmul(x, prep, None, m_tile=choice.m_tile, k_splits=choice.k_splits,
                              n_tile=choice.n_tile, warp_specialized=choice.warp_specialized,
                              stream_k=choice.stream_k,
                              stream_k_blocks=7 if choice.stream_k else None, out=out)
            ref = x.double() @ ref_w.t()
            err = ((out.double() - ref).norm() / ref.norm()).item()
            good = bool(torch.isfinite(out).all()) and err <= TOLERANCE[dtype]
            cases += 1
            ok += good
            print(f"INT{bits} {dtype} {mode} {choice.label} M={m}: "
                  f"{err:.2e} {'ok' if good else 'NOT OK'}", flush=True)
    print(f"{ok}/{cases} within tolerance")
    return 0 if ok == cases else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
