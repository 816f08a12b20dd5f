"""GPTQ checkpoints (AutoGPTQ / GPTQModel "gptq" and "gptq_v2" formats) <-> kpack-v1.

Layout (W is [N, K] = [out_features, in_features], b = bits, g = group size,
G = ceil(K / g), or 1 for g = -1):

  qweight  int32 [K*b/32, N]   packed along K: word r of column n holds rows
                               (32/b)*r + j at bits [b*j, b*j + b), lowest first.
  qzeros   int32 [G, N*b/32]   packed along N the same way.
  scales   float [G, N]
  g_idx    int32 [K]           group of input row k (default k // g); with act-order
                               (desc_act) it is not monotonic and qweight keeps the
                               original row order.
  w[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])

"gptq" (v1, most checkpoints on the hub) stores z - 1 in each field and readers add 1 back
(AutoGPTQ's torch path: ``zeros = (qzeros >> shift) & mask; zeros = zeros + 1``), so a
field of 2**b - 1 means z = 2**b, which kpack-v1's float zero points hold exactly.
"gptq_v2" (GPTQModel's internal format) stores z itself.

Import turns the codes into kpack-v1's qdata (transposed to [N, K], 2 codes a byte), the
scales to [N, G], the zeros to float zero_points [N, G] (dropped when every z is
2**(b-1): then the weight is plain symmetric), and keeps g_idx only when it is not the
trivial k // g. Act-order weights keep g_idx here; kernels sort the columns once at load
time (dqgemm.act_order.sort_by_group) and permute the activations per call.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..format import QuantizedWeight
from ._common import (all_equal_to, as_tensor, canonical_group_size, check_bits_for,
                      check_g_idx, expect_float, expect_int, expect_shape, integer_zero_points,
                      num_checkpoint_groups, pack_words, tensor_name, trivial_g_idx,
                      unpack_words, words_as_kpack_rows)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {CHECKPOINT_FORMATS}, "
                         f"got {checkpoint_format!r}")


def from_gptq(qweight, qzeros, scales, g_idx=None, bits: int = 4, group_size: int = 128,
              checkpoint_format: str = "gptq", *, name: str = "",
              in_features: Optional[int] = None, out_features: Optional[int] = None,
              detect_symmetric: bool = True) -> QuantizedWeight:
    """A GPTQ layer's tensors -> QuantizedWeight (exact: same dequantized weight).

    Args:
        qweight, qzeros, scales, g_idx: the layer's checkpoint tensors (see module doc).
        bits: 4 or 8. group_size: the checkpoint's group size (-1 = per-channel).
        checkpoint_format: "gptq" (v1: zeros stored minus one) or "gptq_v2".
        name: the layer's name, used in error messages (e.g. "model.layers.0.mlp.up_proj").
        in_features, out_features: when given (the model's Linear), shapes are checked
            against them, which catches a wrong ``bits``.
        detect_symmetric: store a weight whose zeros are all 2**(b-1) as symmetric.
    """
    _check_format(checkpoint_format)
    bits = check_bits_for(tensor_name(name, "bits"), bits)
    qw_name, qz_name = tensor_name(name, "qweight"), tensor_name(name, "qzeros")
    s_name, g_name = tensor_name(name, "scales"), tensor_name(name, "g_idx")
    qweight, qzeros = as_tensor(qweight, qw_name), as_tensor(qzeros, qz_name)
    scales = as_tensor(scales, s_name)
    expect_int(qw_name, qweight)
    expect_int(qz_name, qzeros)
    expect_float(s_name, scales)
    if qweight.dim() != 2:
        raise ValueError(f"{qw_name}: expected a 2-D [K*bits/32, N] int32 tensor, "
                         f"got shape {tuple(qweight.shape)}")
    per = 32 // bits
    n = qweight.shape[1] if out_features is None else out_features
    k = qweight.shape[0] * per if in_features is None else in_features
    if k % per or n % per:
        raise ValueError(f"{qw_name}: GPTQ {bits}-bit packing needs in_features and "
                         f"out_features divisible by {per}, got K={k}, N={n}")
    expect_shape(qw_name, qweight, (k * bits // 32, n),
                 f"[K*bits/32, N] for K={k}, N={n}, bits={bits}")
    groups = num_checkpoint_groups(k, group_size)
    expect_shape(s_name, scales, (groups, n),
                 f"[ceil(K/group_size), N] for K={k}, group_size={group_size}")
    expect_shape(qz_name, qzeros, (groups, n * bits // 32),
                 f"[ceil(K/group_size), N*bits/32] for group_size={group_size}, bits={bits}")
    gs = canonical_group_size(tensor_name(name, "group_size"), group_size, k)
    if g_idx is not None:
        g_idx = check_g_idx(g_name, as_tensor(g_idx, g_name), k, groups)
        if trivial_g_idx(g_idx, gs, k):
            g_idx = None

    # qweight's column n is row n's codes packed along K: kpack-v1's bytes once transposed.
    qdata = words_as_kpack_rows(qweight.t(), bits, k)    # [N, K*b/8]
    zeros = unpack_words(qzeros, bits, dim=1)             # [G, N]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    scale_dtype = scales.dtype
    zero_points = zeros.t().to(scale_dtype).contiguous()
    if detect_symmetric and all_equal_to(zeros, float(1 << (bits - 1))):
        zero_points = None
    return QuantizedWeight(
        qdata=qdata, scales=scales.t().contiguous(), bits=bits,
        group_size=gs, in_features=k, zero_points=zero_points, g_idx=g_idx)


def to_gptq(qweight: QuantizedWeight, checkpoint_format: str = "gptq_v2", *,
            scale_dtype: torch.dtype = torch.float16, name: str = "") -> Dict[str, torch.Tensor]:
    """QuantizedWeight -> {"qweight", "qzeros", "scales", "g_idx"} in the GPTQ layout.

    Raises ValueError for weights GPTQ cannot hold: offsets (GGUF Q4_1), fractional zero
    points, zero points outside what ``checkpoint_format`` can store, or N, K not
    divisible by 32/bits.
    """
    _check_format(checkpoint_format)
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight: expected a QuantizedWeight, got {type(qweight).__name__}")
    bits, k, n = qweight.bits, qweight.in_features, qweight.out_features
    per = 32 // bits
    if k % per or n % per:
        raise ValueError(f"{name or 'qweight'}: GPTQ {bits}-bit packing needs in_features and "
                         f"out_features divisible by {per}, got K={k}, N={n}")
    if qweight.offsets is not None:
        raise ValueError(f"{tensor_name(name, 'offsets')}: GPTQ cannot store an additive "
                         f"offset (w = q*s + m); expected a symmetric or zero-point weight")
    if qweight.zero_points is None:
        zeros = torch.full((n, qweight.num_groups), 1 << (bits - 1), dtype=torch.int64,
                           device=qweight.device)
    else:
        # v1 stores z - 1 in b bits, so it holds z in [1, 2**b]; v2 holds [0, 2**b - 1].
        low, high = (1, 1 << bits) if checkpoint_format == "gptq" else (0, (1 << bits) - 1)
        zeros = integer_zero_points(tensor_name(name, "zero_points"), qweight.zero_points,
                                    low, high)
    if checkpoint_format == "gptq":
        zeros = zeros - 1
    codes = qweight.codes().t().contiguous()               # [K, N]
    g_idx = qweight.group_index().to(torch.int32)
    return {
        "qweight": pack_words(codes, bits, dim=0),
        "qzeros": pack_words(zeros.t().contiguous(), bits, dim=1),
        "scales": qweight.scales.t().to(scale_dtype).contiguous(),
        "g_idx": g_idx.contiguous(),
    }


def gptq_quantize_config(qweight: QuantizedWeight, checkpoint_format: str = "gptq_v2"
                         ) -> Dict[str, object]:
    """The quantize_config.json entries describing an exported layer."""
    return {"quant_method": "gptq", "bits": qweight.bits,
            "group_size": qweight.group_size, "desc_act": qweight.g_idx is not None,
            "sym": qweight.zero_points is None, "checkpoint_format": checkpoint_format}
