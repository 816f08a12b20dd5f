"""compressed-tensors "pack-quantized" checkpoints (llm-compressor output) <-> kpack-v1.

Layout (W is [N, K], b = bits in {4, 8}, signed integer quantization):

  weight_packed      int32 [N, ceil(K*b/32)]  packed along K, densely: element k of a row
                     sits at bit k*b of the row's little-endian word stream. The stored
                     value is the signed code plus 2**(b-1), i.e. an unsigned code.
  weight_scale       float [N, K/g] ("group" strategy), [N, 1] ("channel"), or one value
                     ("tensor").
  weight_zero_point  asymmetric only: signed zero points, packed the same way but along
                     dim 0: int32 [ceil(N*b/32), G] (older files: unpacked int [N, G]).
  weight_g_idx       optional int32 [K] (actorder="group").
  weight_shape       (N, K).
  w = (q_signed - zp_signed) * scale

The unsigned stored code is exactly kpack-v1's code, and the 4-bit word stream has the
same nibble order as kpack-v1's bytes (low nibble = even k), so import is a re-slice of the
words; signed zero points become unsigned ones (zp + 2**(b-1)), and all-zero signed zero
points (symmetric) become kpack-v1's symmetric mode.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..format import QuantizedWeight
from ._common import (all_equal_to, as_tensor, canonical_group_size, check_bits_for,
                      check_g_idx, expect_float, expect_int, expect_shape, integer_zero_points,
                      pack_words, tensor_name, trivial_g_idx, unpack_words,
                      words_as_kpack_rows)


def _pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] unsigned codes -> [R, ceil(C*b/32)] int32, zero padded at the end."""
    per = 32 // bits
    pad = (-codes.shape[1]) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return pack_words(codes, bits, dim=1)


def _shape_tuple(weight_shape, name: str) -> Sequence[int]:
    if isinstance(weight_shape, torch.Tensor):
        weight_shape = weight_shape.tolist()
    try:
        shape = tuple(int(v) for v in weight_shape)
    except TypeError:
        raise TypeError(f"{name}: expected (out_features, in_features), got "
                        f"{weight_shape!r}") from None
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"{name}: expected (out_features, in_features) with positive sizes, "
                         f"got {shape}")
    return shape


def from_compressed_tensors(weight_packed, weight_scale, weight_shape, num_bits: int = 4,
                            group_size: Optional[int] = None, weight_zero_point=None,
                            weight_g_idx=None, *, name: str = "",
                            detect_symmetric: bool = True) -> QuantizedWeight:
    """A pack-quantized layer's tensors -> QuantizedWeight (exact).

    group_size: the scheme's group size; None infers it from weight_scale (K / columns;
    one column = per-channel). A single-element weight_scale (tensor strategy) is
    broadcast to per-channel.
    """
    p_name, s_name = tensor_name(name, "weight_packed"), tensor_name(name, "weight_scale")
    z_name, g_name = tensor_name(name, "weight_zero_point"), tensor_name(name, "weight_g_idx")
    bits = check_bits_for(tensor_name(name, "num_bits"), num_bits)
    n, k = _shape_tuple(weight_shape, tensor_name(name, "weight_shape"))
    packed = as_tensor(weight_packed, p_name)
    scale = as_tensor(weight_scale, s_name)
    expect_int(p_name, packed)
    expect_float(s_name, scale)
    expect_shape(p_name, packed, (n, -(-k * bits // 32)),
                 f"[N, ceil(K*num_bits/32)] for weight_shape=({n}, {k}), num_bits={bits}")
    if scale.numel() == 1:                     # tensor strategy
        scale = scale.reshape(1, 1).expand(n, 1)
    if scale.dim() == 1 and scale.shape[0] == n:
        scale = scale.unsqueeze(1)
    if scale.dim() != 2 or scale.shape[0] != n:
        raise ValueError(f"{s_name}: expected shape [N, groups] with N={n}, got "
                         f"{tuple(scale.shape)}")
    groups = scale.shape[1]
    if group_size is None:
        if k % groups:
            raise ValueError(f"{s_name}: expected a number of groups (columns) that divides "
                             f"in_features={k}, got {groups}")
        group_size = k // groups
    else:
        expected_groups = 1 if group_size in (-1, k) else -(-k // group_size)
        expect_shape(s_name, scale, (n, expected_groups),
                     f"[N, ceil(K/group_size)] for K={k}, group_size={group_size}")
    gs = canonical_group_size(tensor_name(name, "group_size"), group_size, k)

    g_idx = None
    if weight_g_idx is not None:
        g_idx = check_g_idx(g_name, as_tensor(weight_g_idx, g_name), k, groups)
        if trivial_g_idx(g_idx, gs, k):
            g_idx = None

    half = 1 << (bits - 1)
    qdata = words_as_kpack_rows(packed, bits, k)     # the stored codes are kpack-v1's
    zero_points = None
    if weight_zero_point is not None:
        zp = as_tensor(weight_zero_point, z_name)
        expect_int(z_name, zp)
        packed_rows = -(-n * bits // 32)
        if zp.dtype == torch.int32 and tuple(zp.shape) == (packed_rows, groups) and packed_rows != n:
            zu = unpack_words(zp.t().contiguous(), bits, dim=1)[:, :n].t()   # unsigned
        elif tuple(zp.shape) == (n, groups):
            zu = zp.to(torch.int64) + half          # signed, unpacked (older files)
            if zu.numel() and (int(zu.min()) < 0 or int(zu.max()) >= (1 << bits)):
                raise ValueError(f"{z_name}: expected signed zero points in [{-half}, "
                                 f"{half - 1}], got range [{int(zp.min())}, {int(zp.max())}]")
        else:
            raise ValueError(f"{z_name}: expected shape ({packed_rows}, {groups}) (packed along "
                             f"dim 0) or ({n}, {groups}), got {tuple(zp.shape)}")
        if not (detect_symmetric and all_equal_to(zu, float(half))):
            zero_points = zu.to(scale.dtype).contiguous()
    return QuantizedWeight(qdata=qdata, scales=scale.contiguous(), bits=bits,
                           group_size=gs, in_features=k, zero_points=zero_points, g_idx=g_idx)


def to_compressed_tensors(qweight: QuantizedWeight, *, name: str = "",
                          scale_dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """QuantizedWeight -> {"weight_packed", "weight_scale", "weight_shape",
    ["weight_zero_point"], ["weight_g_idx"]} in the pack-quantized layout."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight: expected a QuantizedWeight, got {type(qweight).__name__}")
    if qweight.offsets is not None:
        raise ValueError(f"{tensor_name(name, 'offsets')}: compressed-tensors pack-quantized "
                         f"cannot store an additive offset (w = q*s + m)")
    bits, n, k = qweight.bits, qweight.out_features, qweight.in_features
    out = {
        "weight_packed": _pack_dense(qweight.codes(), bits),
        "weight_scale": qweight.scales.to(scale_dtype or qweight.scales.dtype).contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if qweight.zero_points is not None:
        zu = integer_zero_points(tensor_name(name, "zero_points"), qweight.zero_points,
                                 0, (1 << bits) - 1)            # [N, G] unsigned
        # Packed along dim 0: pack the transpose along its columns, transpose back.
        out["weight_zero_point"] = _pack_dense(zu.t().contiguous(), bits).t().contiguous()
    if qweight.g_idx is not None:
        out["weight_g_idx"] = qweight.g_idx.to(torch.int32).contiguous()
    return out


def compressed_tensors_scheme(qweight: QuantizedWeight) -> Dict[str, object]:
    """The quantization args (``config_groups[...]["weights"]``) of an exported layer."""
    gs = qweight.group_size
    return {"num_bits": qweight.bits, "type": "int", "symmetric": qweight.zero_points is None,
            "strategy": "channel" if gs == -1 else "group",
            "group_size": None if gs == -1 else gs,
            "actorder": "group" if qweight.g_idx is not None else None}
