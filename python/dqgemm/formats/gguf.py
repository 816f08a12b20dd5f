"""GGUF (llama.cpp) quantized tensors <-> kpack-v1: Q4_0, Q4_1 and Q8_0 blocks.

A GGUF weight of shape (N, K) (GGUF lists dimensions innermost first, i.e. (K, N)) is
N rows of K / 32 blocks; each block covers 32 consecutive weights of a row along K, so
the blocks map to kpack-v1 groups of 32:

  Q4_0  18 bytes: fp16 d, 16 bytes qs; byte j holds element j (low nibble) and
        element j + 16 (high nibble).        w = (q - 8) * d      -> symmetric 4-bit
  Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes qs as Q4_0.
                                             w = q * d + m        -> offsets 4-bit
  Q8_0  34 bytes: fp16 d, 32 int8 qs.       w = qs * d           -> symmetric 8-bit with
                                                                    code = qs + 128
All three are exact in kpack-v1 with fp16 scales (and offsets): no re-quantization.
The pip package ``gguf`` (gguf.quants.quantize / dequantize, GGUFReader) is the reference
the tests compare against.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np
import torch

from ..format import QuantizedWeight
from ._common import tensor_name

QK = 32   # weights per block


@dataclasses.dataclass(frozen=True)
class GGMLBlockType:
    name: str
    type_id: int          # ggml_type enum value in llama.cpp / gguf.GGMLQuantizationType
    block_bytes: int
    bits: int


GGML_TYPES: Dict[str, GGMLBlockType] = {
    "Q4_0": GGMLBlockType("Q4_0", 2, 18, 4),
    "Q4_1": GGMLBlockType("Q4_1", 3, 20, 4),
    "Q8_0": GGMLBlockType("Q8_0", 8, 34, 8),
}
_BY_ID = {t.type_id: t for t in GGML_TYPES.values()}


def ggml_block_type(ggml_type, name: str = "ggml_type") -> GGMLBlockType:
    """Resolves "Q4_0", an int type id or a gguf.GGMLQuantizationType member."""
    key = ggml_type
    if hasattr(key, "name") and hasattr(key, "value") and not isinstance(key, str):  # enum
        key = key.name
    if isinstance(key, str):
        found = GGML_TYPES.get(key.upper())
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        found = _BY_ID.get(int(key))
    else:
        found = None
    if found is None:
        raise ValueError(f"{name}: expected one of {tuple(GGML_TYPES)} (supported GGUF "
                         f"quantized types), got {ggml_type!r}")
    return found


def _as_bytes(data, name: str) -> torch.Tensor:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"{name}: expected raw bytes as uint8, got numpy {data.dtype}")
        if not data.flags.writeable or not data.flags.c_contiguous:
            data = np.array(data, copy=True)   # torch wants writable memory (GGUF memmaps)
        return torch.from_numpy(data).reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"{name}: expected raw bytes as uint8, got {data.dtype}")
        return data.contiguous().reshape(-1)
    raise TypeError(f"{name}: expected a uint8 numpy array, torch tensor or bytes, got "
                    f"{type(data).__name__}")


def _fp16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of each block as fp16 (little-endian, as GGUF stores them)."""
    lo = blocks[..., start].to(torch.int32)
    hi = blocks[..., start + 1].to(torch.int32)
    word = lo | (hi << 8)
    word = torch.where(word >= 1 << 15, word - (1 << 16), word)   # same 16 bits, signed
    return word.to(torch.int16).view(torch.float16)


def _blocks_to_kpack(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] GGUF nibble bytes -> [..., 16] kpack-v1 bytes of the same 32 codes.

    GGUF byte j holds elements j (low nibble) and j + 16 (high); kpack-v1 byte i holds
    elements 2i (low) and 2i + 1 (high). Split the nibbles into the 32 codes in order, then
    pair neighbours. (Strided uint8 shifts straight on the bytes are ~20x slower in PyTorch
    on the CPU.)
    """
    qs = qs.contiguous()        # elementwise uint8 ops on the strided block view are slow
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)                  # [..., 32], in order
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def from_gguf(data, ggml_type, shape: Tuple[int, int], *, name: str = "") -> QuantizedWeight:
    """Raw GGUF blocks of an (N, K) weight -> QuantizedWeight (exact, group_size=32).

    data: the tensor's bytes (numpy/torch uint8 of any shape, or bytes), N * K/32 blocks.
    ggml_type: "Q4_0", "Q4_1", "Q8_0" (or the gguf package's enum / its int value).
    shape: (N, K) = (out_features, in_features), i.e. GGUF's dims reversed.
    """
    btype = ggml_block_type(ggml_type, tensor_name(name, "ggml_type"))
    try:
        n, k = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{tensor_name(name, 'shape')}: expected (out_features, in_features), "
                         f"got {shape!r}") from None
    if n <= 0 or k <= 0 or k % QK:
        raise ValueError(f"{tensor_name(name, 'shape')}: expected positive (N, K) with K a "
                         f"multiple of {QK} (the GGUF block size), got {(n, k)}")
    raw = _as_bytes(data, name or "data")
    nblk = k // QK
    expected = n * nblk * btype.block_bytes
    if raw.numel() != expected:
        raise ValueError(f"{name or 'data'}: expected {expected} bytes for a {btype.name} "
                         f"tensor of shape (N={n}, K={k}) ({n}*{nblk} blocks of "
                         f"{btype.block_bytes} bytes), got {raw.numel()}")
    blocks = raw.reshape(n, nblk, btype.block_bytes)
    d = _fp16_field(blocks, 0)                                   # [N, K/32]
    offsets = None
    if btype.name == "Q8_0":
        # int8 q -> unsigned code q + 128: flipping the top bit of the byte does exactly that.
        qdata = blocks[..., 2:] ^ 0x80
    elif btype.name == "Q4_0":
        qdata = _blocks_to_kpack(blocks[..., 2:])
    else:  # Q4_1
        offsets = _fp16_field(blocks, 2).contiguous()
        qdata = _blocks_to_kpack(blocks[..., 4:])
    return QuantizedWeight(qdata=qdata.reshape(n, -1).contiguous(), scales=d.contiguous(),
                           bits=btype.bits, group_size=QK, in_features=k, offsets=offsets)


def to_gguf(qweight: QuantizedWeight, ggml_type=None, *, name: str = "") -> Tuple[np.ndarray, str]:
    """QuantizedWeight -> (uint8 blocks [N, K/32 * block_bytes], type name).

    Exact only for weights that are one of the three block types: group_size 32, fp16
    scales; symmetric 4-bit -> Q4_0, 4-bit with offsets -> Q4_1, symmetric 8-bit -> Q8_0.
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight: expected a QuantizedWeight, got {type(qweight).__name__}")
    mode = qweight.zero_mode
    natural = {(4, "symmetric"): "Q4_0", (4, "offsets"): "Q4_1", (8, "symmetric"): "Q8_0"}
    target = natural.get((qweight.bits, mode))
    if target is None or qweight.group_size != QK or qweight.g_idx is not None:
        raise ValueError(f"{name or 'qweight'}: expected group_size=32 without g_idx and "
                         f"bits/mode in {{4 symmetric: Q4_0, 4 offsets: Q4_1, 8 symmetric: "
                         f"Q8_0}}, got bits={qweight.bits}, {mode}, "
                         f"group_size={qweight.group_size}")
    if ggml_type is not None and ggml_block_type(ggml_type).name != target:
        raise ValueError(f"ggml_type: this weight maps to {target}, got {ggml_type!r}")
    if qweight.scales.dtype != torch.float16 or (
            qweight.offsets is not None and qweight.offsets.dtype != torch.float16):
        raise ValueError(f"{tensor_name(name, 'scales')}: GGUF blocks hold fp16 d (and m); "
                         f"expected float16, got {qweight.scales.dtype}")
    n, k = qweight.shape
    codes = qweight.codes().cpu().reshape(n, k // QK, QK)

    def fp16_bytes(t):
        return t.cpu().contiguous().view(torch.int16).view(torch.uint8).reshape(n, k // QK, 2)

    parts = [fp16_bytes(qweight.scales)]
    if target == "Q8_0":
        parts.append((codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:
        if target == "Q4_1":
            parts.append(fp16_bytes(qweight.offsets))
        parts.append(codes[..., :16] | (codes[..., 16:] << 4))
    blocks = torch.cat(parts, dim=-1).reshape(n, -1)
    return blocks.numpy(), target
