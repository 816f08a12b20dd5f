"""Kernel "cuda_dequant_gemm": dequantize to fp16/bf16 with csrc/dequantize.cu, then cuBLAS.

What it computes: y = x @ dequant(W)^T (+ bias), in two launches: the CUDA dequantize kernel
writes a dense [N, K] weight in x's dtype into a scratch buffer, then
torch.nn.functional.linear (cuBLAS) multiplies. The extra pass moves K*N*(bits/8 + 2) bytes,
so it pays off only where the GEMM itself is long (large M, the prefill regime).

Prepared layout: canonical qdata/scales on the GPU; zero points or offsets as fp32 (the
kernel's ``zeros`` operand). Act-order weights have their columns sorted by group at load
time (act_order.contiguous_groups): ``act_index`` is then the permutation, applied to x's
columns once per call, and the dequantize kernel reads groups in order (its fast path).
Only a g_idx whose groups are not all of group_size columns (no contiguous layout exists)
is kept as ``g_idx`` and looked up per element. Constraints: CUDA device, fp16/bf16
activations.
Test: tests/test_cuda.py. Benchmark: python -m dqgemm bench --backends cuda.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _ext, registry
from ..act_order import contiguous_groups
from ..format import effective_group_size, num_groups


@dataclasses.dataclass
class DequantPrepared(registry.PreparedWeight):
    """``act_index``: column permutation of x (sorted act-order weight) or None;
    ``g_idx``: int32 [K] group of each column, only for irregular act-order groups."""

    g_idx: Optional[torch.Tensor] = None


def dequantize_into(out: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                    zeros_fp32: Optional[torch.Tensor], zero_mode: str,
                    g_idx: Optional[torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """Launches the dequantize kernel on torch's current stream; fills ``out`` [N, K]."""
    ext = _ext.extension()
    if ext is None:
        raise RuntimeError(f"dqgemm CUDA extension {_ext.extension_error()}")
    n, k = out.shape
    for name, t in (("qdata", qdata), ("scales", scales), ("zeros", zeros_fp32),
                    ("g_idx", g_idx)):
        if t is not None and (t.device != out.device or not t.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous tensor on {out.device}, got "
                             f"device {t.device}, contiguous={t.is_contiguous()}")
    ext.dequantize(
        qdata=qdata.data_ptr(), scales=scales.data_ptr(),
        zeros=0 if zeros_fp32 is None else zeros_fp32.data_ptr(),
        g_idx=0 if g_idx is None else g_idx.data_ptr(), out=out.data_ptr(),
        n=n, k=k, row_bytes=qdata.shape[1], num_groups=num_groups(k, group_size),
        group_size=effective_group_size(k, group_size), bits=bits,
        scale_dtype=_ext.dtype_code(scales.dtype, "scales"),
        out_dtype=_ext.dtype_code(out.dtype, "out"),
        zero_mode=_ext.ZERO_MODE_CODES[zero_mode], stream=_ext.stream_handle(out.device))
    return out


def zero_mode_of(prepared: registry.PreparedWeight) -> str:
    if prepared.zero_points is not None:
        return "zero_points"
    if prepared.offsets is not None:
        return "offsets"
    return "symmetric"


class CudaDequantGemmKernel(registry.Kernel):
    name = "cuda_dequant_gemm"
    backend = "cuda"
    priority = 10

    def available(self):
        return _ext.cuda_unavailable_reason()

    def supports(self, problem):
        if problem.device_type != "cuda":
            return f"needs a CUDA device, got {problem.device_type}"
        if problem.dtype not in (torch.float16, torch.bfloat16):
            return f"needs fp16/bf16 activations, got {problem.dtype}"
        return None

    def prepare(self, qweight):
        def fp32(t):
            return None if t is None else t.float().contiguous()
        try:
            qw, perm = contiguous_groups(qweight)
        except ValueError:   # groups of unequal sizes: keep the per-element lookup
            qw, perm = qweight, None
        return DequantPrepared(
            packed=qw.qdata.contiguous(), scales=qw.scales.contiguous(),
            zero_points=fp32(qw.zero_points), offsets=fp32(qw.offsets),
            act_index=None if perm is None else perm.to(torch.int64).contiguous(),
            g_idx=None if qw.g_idx is None else qw.g_idx.to(torch.int32).contiguous())

    def run(self, x, prepared, bias, spec):
        weight = torch.empty(spec.out_features, spec.in_features, dtype=x.dtype,
                             device=x.device)
        mode = zero_mode_of(prepared)
        zeros = prepared.zero_points if mode == "zero_points" else prepared.offsets
        dequantize_into(weight, prepared.packed, prepared.scales, zeros, mode,
                        prepared.g_idx, spec.bits, spec.group_size)
        if prepared.act_index is not None:
            x = x.index_select(x.dim() - 1, prepared.act_index)  # the one gather per call
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)


registry.register(CudaDequantGemmKernel())
