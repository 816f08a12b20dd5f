"""Small cuda_decode sweep meant to run under compute-sanitizer (memcheck / racecheck).

    compute-sanitizer --tool memcheck python bench/cuda_decode_sanitize.py
    compute-sanitizer --tool racecheck python bench/cuda_decode_sanitize.py

Covers every kernel configuration family it can cheaply reach: 4/8-bit, fp16/bf16, the four
token tiles (M = 1, 9, 33, 64), grouped and per-channel, all zero modes, the stream-K fixup
(long K, few channels) and N/K tails; at M <= 16 both the configuration with a copying warp
(with its programmatic launch) and the others; every M also as a programmatic launch of
the cp.async rings. The reference runs on the CPU (no cuBLAS
under the tool).
"""
import torch

import dqgemm
from dqgemm.kernels import cuda_decode as cd

failures = 0
cases = 0
for bits in (4, 8):
    for dtype in (torch.float16, torch.bfloat16):
        for (n, k, gs, sym) in ((200, 576, 64, True), (256, 2304, -1, False), (136, 1536, 128, True)):
            w = torch.randn(n, k) * 0.02
            qw = dqgemm.quantize(w, bits, gs, symmetric=sym)
            if gs == 128:
                qw = qw.replace(offsets=torch.randn(n, qw.num_groups).half() * 0.01)
            prep = cd.prepare_decode(qw.cuda())
            ref_w = qw.dequantize(torch.float64)
            for m in (1, 9, 33, 64):
                x = torch.randn(m, k).to(dtype)
                ref = x.double() @ ref_w.t()
                for launch in (({"producer_warp": True, "programmatic_launch": True},
                                {"producer_warp": False},
                                {"producer_warp": False, "programmatic_launch": True})
                               if m <= 16 else ({}, {"programmatic_launch": True})):
                    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                    cd.decode_matmul(x.cuda(), prep, None, out=out, **launch)
                    err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
                    cases += 1
                    tol = 2e-3 if dtype == torch.float16 else 1e-2
                    if not err <= tol:
                        failures += 1
                        print(f"FAIL bits={bits} {dtype} n={n} k={k} gs={gs} m={m} {launch}: "
                              f"{err:.3e}")
torch.cuda.synchronize()
print(f"sanitize sweep: {cases} cases, {failures} failures")
