"""AWQ checkpoints (AutoAWQ WQLinear_GEMM / llm-awq "gemm" version) <-> kpack-v1.

Layout (W is [N, K], 4-bit only, g = group size, G = K / g):

  qweight  int32 [K, N/8]   packed along N, with a column shuffle: field i (bits 4i..4i+3)
                            of word c holds column 8c + ORDER[i], ORDER = [0,2,4,6,1,3,5,7]
                            (the order AutoAWQ's fast dequantizer unpacks in).
  qzeros   int32 [G, N/8]   the same packing; zeros stored as they are (no minus one).
  scales   float [G, N]
  w[k, n] = scales[k // g, n] * (q[k, n] - z[k // g, n])

No act-order. The "gemv" variants (packed along K, other shapes) are not this layout and
are rejected by the shape checks.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..format import QuantizedWeight, pack_codes
from ._common import (all_equal_to, as_tensor, canonical_group_size, expect_float, expect_int,
                      expect_shape, integer_zero_points, num_checkpoint_groups, pack_words,
                      tensor_name, unpack_words)

AWQ_BITS = 4
# Field i of a word holds column 8c + AWQ_ORDER[i]; column 8c + j is field AWQ_INVERSE[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_INVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def _unshuffle(fields: torch.Tensor) -> torch.Tensor:
    """[R, 8C] fields in word order -> [R, 8C] values in column order."""
    r, c8 = fields.shape
    idx = torch.tensor(AWQ_INVERSE, device=fields.device)
    return fields.reshape(r, c8 // 8, 8).index_select(2, idx).reshape(r, c8)


def _shuffle(values: torch.Tensor) -> torch.Tensor:
    """Inverse of _unshuffle: column order -> AWQ word order."""
    r, c8 = values.shape
    idx = torch.tensor(AWQ_ORDER, device=values.device)
    return values.reshape(r, c8 // 8, 8).index_select(2, idx).reshape(r, c8)


def from_awq(qweight, qzeros, scales, group_size: int = 128, bits: int = 4, *, name: str = "",
             in_features: Optional[int] = None, out_features: Optional[int] = None,
             detect_symmetric: bool = True) -> QuantizedWeight:
    """An AWQ GEMM layer's tensors -> QuantizedWeight (exact: same dequantized weight)."""
    qw_name, qz_name = tensor_name(name, "qweight"), tensor_name(name, "qzeros")
    s_name = tensor_name(name, "scales")
    if bits != AWQ_BITS:
        raise ValueError(f"{tensor_name(name, 'bits')}: expected 4 (AWQ GEMM is 4-bit only), "
                         f"got {bits!r}")
    qweight, qzeros = as_tensor(qweight, qw_name), as_tensor(qzeros, qz_name)
    scales = as_tensor(scales, s_name)
    expect_int(qw_name, qweight)
    expect_int(qz_name, qzeros)
    expect_float(s_name, scales)
    if qweight.dim() != 2:
        raise ValueError(f"{qw_name}: expected a 2-D [K, N/8] int32 tensor, got shape "
                         f"{tuple(qweight.shape)}")
    k = qweight.shape[0] if in_features is None else in_features
    n = qweight.shape[1] * 8 if out_features is None else out_features
    if n % 8:
        raise ValueError(f"{qw_name}: AWQ packing needs out_features divisible by 8, got N={n}")
    expect_shape(qw_name, qweight, (k, n // 8), f"[K, N/8] for K={k}, N={n}")
    groups = num_checkpoint_groups(k, group_size)
    expect_shape(s_name, scales, (groups, n),
                 f"[K/group_size, N] for K={k}, group_size={group_size}")
    expect_shape(qz_name, qzeros, (groups, n // 8),
                 f"[K/group_size, N/8] for K={k}, group_size={group_size}")
    gs = canonical_group_size(tensor_name(name, "group_size"), group_size, k)

    codes = _unshuffle(unpack_words(qweight, 4, dim=1))   # [K, N]
    zeros = _unshuffle(unpack_words(qzeros, 4, dim=1))    # [G, N]
    zero_points = zeros.t().to(scales.dtype).contiguous()
    if detect_symmetric and all_equal_to(zeros, 8.0):
        zero_points = None
    return QuantizedWeight(qdata=pack_codes(codes.t(), 4), scales=scales.t().contiguous(),
                           bits=4, group_size=gs, in_features=k, zero_points=zero_points)


def to_awq(qweight: QuantizedWeight, *, scale_dtype: torch.dtype = torch.float16,
           name: str = "") -> Dict[str, torch.Tensor]:
    """QuantizedWeight -> {"qweight", "qzeros", "scales"} in the AWQ GEMM layout."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight: expected a QuantizedWeight, got {type(qweight).__name__}")
    if qweight.bits != 4:
        raise ValueError(f"{tensor_name(name, 'bits')}: AWQ holds 4-bit weights only, "
                         f"got bits={qweight.bits}")
    if qweight.g_idx is not None:
        raise ValueError(f"{tensor_name(name, 'g_idx')}: AWQ has no act-order; sort the weight "
                         f"first (dqgemm.act_order.sort_by_group)")
    if qweight.offsets is not None:
        raise ValueError(f"{tensor_name(name, 'offsets')}: AWQ cannot store an additive offset")
    n = qweight.out_features
    if n % 8:
        raise ValueError(f"{name or 'qweight'}: AWQ packing needs out_features divisible by 8, "
                         f"got {n}")
    if qweight.zero_points is None:
        zeros = torch.full((n, qweight.num_groups), 8, dtype=torch.int64, device=qweight.device)
    else:
        zeros = integer_zero_points(tensor_name(name, "zero_points"), qweight.zero_points, 0, 15)
    codes = qweight.codes().t().contiguous()               # [K, N]
    return {
        "qweight": pack_words(_shuffle(codes), 4, dim=1),
        "qzeros": pack_words(_shuffle(zeros.t().contiguous()), 4, dim=1),
        "scales": qweight.scales.t().to(scale_dtype).contiguous(),
    }
