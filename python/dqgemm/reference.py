"""The pure-PyTorch reference path: dequantize the canonical format and multiply.

It runs on any device torch supports, is the fallback backend ("reference") and is the
oracle every kernel test compares against. It favours clarity over speed: the weight is
dequantized to fp32 on each call.
"""

from __future__ import annotations

from typing import Optional

import torch

from .format import QuantizedWeight, effective_group_size, unpack_codes


def _expand_groups(per_group: torch.Tensor, group_index: Optional[torch.Tensor],
                   group_size: int, in_features: int) -> torch.Tensor:
    """[N, G] -> [N, K]: the value of each column's group."""
    if group_index is not None:
        return per_group.index_select(1, group_index)
    gs = effective_group_size(in_features, group_size)
    return per_group.repeat_interleave(gs, dim=1)


def dequantize_tensors(qdata: torch.Tensor, scales: torch.Tensor,
                       zero_points: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                       g_idx: Optional[torch.Tensor], bits: int, group_size: int,
                       in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantizes canonical kpack-v1 tensors into a dense [N, K] weight.

    Arithmetic is fp32 throughout; the result is cast to ``dtype`` at the end.
    """
    codes = unpack_codes(qdata, bits, in_features).float()
    group_index = g_idx.long() if g_idx is not None else None

    def expand(t):
        return _expand_groups(t.float(), group_index, group_size, in_features)

    s = expand(scales)
    if zero_points is not None:
        w = (codes - expand(zero_points)) * s
    elif offsets is not None:
        w = codes * s + expand(offsets)
    else:
        w = (codes - float(1 << (bits - 1))) * s
    return w.to(dtype)


def dequantize(qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_tensors(qweight.qdata, qweight.scales, qweight.zero_points,
                              qweight.offsets, qweight.g_idx, qweight.bits,
                              qweight.group_size, qweight.in_features, dtype)


def reference_matmul(x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) in fp32, returned in x's dtype."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
