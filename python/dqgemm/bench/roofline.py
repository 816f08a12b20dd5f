"""The roofline of a case: the time no kernel can beat by much, from ceilings measured in
the same run.

Ceilings (measured once per run, on the device the cases run on):
  bandwidth  a large device-to-device copy, counting bytes read + bytes written;
  peak       a large square matmul in fp16 (8192^3 on a GPU) on random data.
Floor of a case: max(bytes / bandwidth, 2*M*N*K / peak), with bytes the fewest a kernel
must move: the packed weight, its scales (and zero points), the activation read once and
the output written once. For a quantized case the weight bytes are those of the canonical
kpack-v1 format at that bits/group size (torch's INT4 kernel is held to the same INT4
floor, so its percentage compares with ours).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Optional

import torch

from .. import registry


@dataclasses.dataclass
class Roofline:
    bandwidth_gb_s: float      # (bytes read + bytes written) / s / 1e9
    peak_tflop_s: float
    peak_dtype: str
    copy_bytes: int            # size of the copied buffer
    matmul_size: int           # the peak was measured on a size^3 matmul

    def floor_us(self, flops: float, nbytes: float) -> float:
        return max(nbytes / (self.bandwidth_gb_s * 1e3), flops / (self.peak_tflop_s * 1e6))


def weight_bytes(k: int, n: int, bits: int, group_size: Optional[int],
                 scale_bytes: int = 2, zero_points: bool = False) -> int:
    """Bytes of a [N, K] weight: dense (bits=16) or kpack-v1 packed with its scales."""
    if bits == 16:
        return 2 * k * n
    groups = 1 if group_size in (None, -1) else k // group_size
    per_group = scale_bytes * (2 if zero_points else 1)
    return n * ((k * bits + 7) // 8) + n * groups * per_group


def case_bytes(m: int, k: int, n: int, bits: int, group_size: Optional[int],
               act_bytes: int = 2) -> int:
    return weight_bytes(k, n, bits, group_size) + act_bytes * m * k + act_bytes * m * n


def case_flops(m: int, k: int, n: int) -> float:
    return 2.0 * m * n * k


def _median_us(fn, device: torch.device, reps: int) -> float:
    import time
    fn()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        samples = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(1000.0 * start.elapsed_time(end))
        return statistics.median(samples)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(samples)


def measure(device: torch.device, dtype: torch.dtype = torch.float16, reps: int = 15,
            copy_bytes: Optional[int] = None, matmul_size: Optional[int] = None) -> Roofline:
    """Measures copy bandwidth and the matmul peak on ``device`` (random data, never zeros)."""
    on_gpu = device.type == "cuda"
    copy_bytes = copy_bytes or (1 << 30 if on_gpu else 16 << 20)
    matmul_size = matmul_size or (8192 if on_gpu else 128)
    reps = reps if on_gpu else min(reps, 5)   # CPU ceilings only scale CPU floors
    gen = torch.Generator(device=device).manual_seed(1234)
    src = torch.randint(0, 256, (copy_bytes,), dtype=torch.uint8, device=device, generator=gen)
    dst = torch.empty_like(src)
    copy_us = _median_us(lambda: dst.copy_(src), device, reps)
    src = dst = None  # free 2 x copy_bytes before the matmul
    a = torch.randn(matmul_size, matmul_size, device=device, generator=gen).to(dtype)
    b = torch.randn(matmul_size, matmul_size, device=device, generator=gen).to(dtype)
    mm_us = _median_us(lambda: torch.mm(a, b), device, reps)
    a = b = None
    return Roofline(
        bandwidth_gb_s=2.0 * copy_bytes / (copy_us * 1e3),
        peak_tflop_s=2.0 * matmul_size ** 3 / (mm_us * 1e6),
        peak_dtype=registry.dtype_name(dtype), copy_bytes=copy_bytes, matmul_size=matmul_size)
