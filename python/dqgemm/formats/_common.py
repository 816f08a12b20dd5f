"""Helpers shared by the checkpoint importers and exporters of dqgemm.formats.

Every importer names the checkpoint tensor it is reading (``name`` prefix, e.g.
``model.layers.0.self_attn.q_proj``) in its errors, so a bad checkpoint says which tensor
is wrong and what was expected. The int32 word packers here are the one place that knows
how frameworks put several b-bit integers in a 32-bit word: element j of a word sits at
bits [b*j, b*j + b), lowest first (GPTQ, AWQ before its column shuffle, compressed-tensors).
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

from ..format import SUPPORTED_GROUP_SIZES, check_bits

INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def tensor_name(prefix: str, field: str) -> str:
    """'prefix.field' (or just 'field' without a prefix): the name used in errors."""
    return f"{prefix}.{field}" if prefix else field


def as_tensor(value, name: str) -> torch.Tensor:
    """torch.Tensor as is; numpy arrays are wrapped (no copy); anything else is a TypeError."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


def expect_shape(name: str, tensor: torch.Tensor, shape: Sequence[int], why: str = "") -> None:
    if tuple(tensor.shape) != tuple(shape):
        because = f" ({why})" if why else ""
        raise ValueError(f"{name}: expected shape {tuple(shape)}{because}, "
                         f"got {tuple(tensor.shape)}")


def expect_dtype(name: str, tensor: torch.Tensor, dtypes: Iterable[torch.dtype]) -> None:
    dtypes = tuple(dtypes)
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got "
                        f"{str(tensor.dtype).replace('torch.', '')}")


def expect_float(name: str, tensor: torch.Tensor) -> None:
    expect_dtype(name, tensor, (torch.float16, torch.bfloat16, torch.float32))


def expect_int(name: str, tensor: torch.Tensor) -> None:
    expect_dtype(name, tensor, INT_DTYPES)


def check_bits_for(name: str, bits, allowed: Tuple[int, ...] = (4, 8)) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"{name}: expected bits in {allowed}, got {bits!r}")
    check_bits(bits)
    return bits


def canonical_group_size(name: str, group_size: int, in_features: int) -> int:
    """The checkpoint's group size as a kpack-v1 group size (-1 when one group spans K)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{name}: expected an int group_size, got {type(group_size).__name__}")
    if group_size == -1 or group_size == in_features:
        return -1
    if group_size not in SUPPORTED_GROUP_SIZES or in_features % group_size:
        raise ValueError(
            f"{name}: group_size={group_size} with in_features={in_features} is not supported: "
            f"expected one of {tuple(g for g in SUPPORTED_GROUP_SIZES if g > 0)} dividing "
            f"in_features, or -1 (per-channel)")
    return group_size


def num_checkpoint_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size in (-1, in_features) else -(-in_features // group_size)


# ----------------------------------------------------------------------------------------
# b-bit integers in int32 words.
# ----------------------------------------------------------------------------------------

def unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Splits each int32 word into 32 // bits fields along ``dim`` (field j at bits b*j).

    [R, C] -> [R * 32/b, C] (dim=0) or [R, C * 32/b] (dim=1); int32 values in [0, 2**b).
    (The right shift is arithmetic for negative words; the mask drops the sign bits.)
    """
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    w = words.to(torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:
        fields = (w.unsqueeze(1) >> shifts.view(1, per, 1)) & mask   # [R, per, C]
        return fields.reshape(words.shape[0] * per, words.shape[1])
    fields = (w.unsqueeze(2) >> shifts.view(1, 1, per)) & mask       # [R, C, per]
    return fields.reshape(words.shape[0], words.shape[1] * per)


def words_as_kpack_rows(words_by_row: torch.Tensor, bits: int, in_features: int
                        ) -> torch.Tensor:
    """int32 words [N, W] packed along K (field j of word w = code k = w*32/b + j, lowest
    bits first) -> kpack-v1 qdata uint8 [N, ceil(K*b/8)].

    For b in {4, 8} the little-endian bytes of such words already are kpack-v1's bytes
    (byte i of word w holds codes 8w/b + 2i, + 1 in its low/high nibble for 4-bit, code
    4w + i for 8-bit), so on little-endian hosts this is a reinterpretation, no unpacking.
    """
    row_bytes = (in_features * bits + 7) // 8
    words_by_row = words_by_row.to(torch.int32).contiguous()
    if sys.byteorder == "little":
        return words_by_row.view(torch.uint8)[:, :row_bytes].contiguous()
    codes = unpack_words(words_by_row, bits, dim=1)[:, :in_features]
    from ..format import pack_codes
    return pack_codes(codes, bits)


def pack_words(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of unpack_words: integers in [0, 2**b) -> int32 words packed along ``dim``.

    The size of ``dim`` must be a multiple of 32 // bits.
    """
    per = 32 // bits
    if values.shape[dim] % per:
        raise ValueError(f"values: expected dim {dim} to be a multiple of {per} for {bits}-bit "
                         f"packing, got shape {tuple(values.shape)}")
    v = values.to(torch.int64)
    shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int64)
    if dim == 0:
        v = v.reshape(values.shape[0] // per, per, values.shape[1])
        words = (v << shifts.view(1, per, 1)).sum(dim=1)
    else:
        v = v.reshape(values.shape[0], values.shape[1] // per, per)
        words = (v << shifts.view(1, 1, per)).sum(dim=2)
    # Back to the signed int32 bit pattern frameworks store.
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32).contiguous()


def integer_zero_points(name: str, zero_points: torch.Tensor, low: int, high: int
                        ) -> torch.Tensor:
    """Float zero points -> int64, checking that they are integers in [low, high]."""
    z = zero_points.float()
    rounded = torch.round(z)
    if not bool((rounded == z).all()):
        bad = int((rounded != z).sum())
        raise ValueError(f"{name}: expected integer zero points for this format, got {bad} "
                         f"fractional values (e.g. {z[rounded != z][0].item()})")
    zi = rounded.to(torch.int64)
    if zi.numel() and (int(zi.min()) < low or int(zi.max()) > high):
        raise ValueError(f"{name}: expected zero points in [{low}, {high}], got range "
                         f"[{int(zi.min())}, {int(zi.max())}]")
    return zi


def check_g_idx(name: str, g_idx: torch.Tensor, in_features: int, groups: int) -> torch.Tensor:
    """Validates an act-order g_idx (int, [K], values in [0, groups)) and returns it int32."""
    expect_int(name, g_idx)
    expect_shape(name, g_idx, (in_features,), "one group index per input column")
    if g_idx.numel():
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= groups:
            raise ValueError(f"{name}: expected values in [0, {groups - 1}] ({groups} groups), "
                             f"got range [{lo}, {hi}]")
    return g_idx.to(torch.int32).contiguous()


def trivial_g_idx(g_idx: Optional[torch.Tensor], group_size: int, in_features: int) -> bool:
    """True when g_idx is None or equals k // group_size (no act-order permutation)."""
    if g_idx is None:
        return True
    gs = in_features if group_size == -1 else group_size
    expected = torch.arange(in_features, device=g_idx.device) // gs
    return bool(torch.equal(g_idx.to(torch.int64), expected))


def all_equal_to(values: torch.Tensor, target: float) -> bool:
    return bool((values.float() == target).all())
