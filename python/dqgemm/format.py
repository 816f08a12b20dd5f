"""The canonical packed weight format of dqgemm: ``kpack-v1``.

Every checkpoint importer converts into this format, every kernel derives its own
layout from it at load time, and it is what ``state_dict`` / safetensors files hold.
The byte-level description lives in docs/FORMAT.md; the short version:

A linear weight W has shape [N, K] = [out_features, in_features] (the nn.Linear layout).
It is stored as

``qdata``        uint8 [N, ceil(K * bits / 8)]. Codes q[n, k] are unsigned integers in
                 [0, 2**bits). Row n holds its K codes in order of k.
                 bits = 8: byte k is q[n, k].
                 bits = 4: byte j holds q[n, 2j] in its low nibble (bits 0-3) and
                 q[n, 2j + 1] in its high nibble (bits 4-7). With odd K the last high
                 nibble is 0 and ignored.
``scales``       float16 / bfloat16 / float32 [N, G], G = K // group_size (1 per-channel).
``zero_points``  optional, a float tensor [N, G] (any float dtype). Integer-valued for
                 GPTQ, AWQ and compressed-tensors; fractional for HQQ.
``offsets``      optional, a float tensor [N, G]; an additive term (GGUF Q4_1's "m").
``g_idx``        optional, int32 [K]: the group of input column k (GPTQ act-order).
                 Without it, column k belongs to group k // group_size.

The dequantized weight, with g = g_idx[k] (or k // group_size):

    symmetric (no zero_points, no offsets):  w = (q - 2**(bits-1)) * scales[n, g]
    zero_points:                             w = (q - zero_points[n, g]) * scales[n, g]
    offsets:                                 w = q * scales[n, g] + offsets[n, g]

zero_points and offsets are mutually exclusive. Group sizes: 32, 64, 128, 256 or -1
(per-channel: one group spanning all of K); group_size must divide K.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Dict, Optional, Tuple

import torch

FORMAT_NAME = "kpack-v1"
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Names of the tensors of a QuantizedWeight, in the order they are saved.
TENSOR_FIELDS = ("qdata", "scales", "zero_points", "offsets", "g_idx")


# ----------------------------------------------------------------------------------------
# Pure-PyTorch pack / unpack of the codes (the byte layout above).
# ----------------------------------------------------------------------------------------

def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes per packed row: ceil(K * bits / 8)."""
    return (in_features * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes [N, K] (values in [0, 2**bits)) into qdata uint8."""
    check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes: expected a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2:
        raise ValueError(f"codes: expected a 2-D [N, K] tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes: expected an integer dtype, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(
            f"codes: expected values in [0, {(1 << bits) - 1}] for {bits}-bit, "
            f"got range [{int(codes.min())}, {int(codes.max())}]")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    n, k = codes.shape
    if k % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    low = codes[:, 0::2]
    high = codes[:, 1::2]
    return (low | (high << 4)).contiguous()


def unpack_codes(qdata: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_codes: qdata uint8 [N, ceil(K*bits/8)] -> codes uint8 [N, K]."""
    check_bits(bits)
    check_positive_int("in_features", in_features)
    if not isinstance(qdata, torch.Tensor) or qdata.dim() != 2:
        shape = tuple(qdata.shape) if isinstance(qdata, torch.Tensor) else type(qdata).__name__
        raise ValueError(f"qdata: expected a 2-D uint8 tensor [N, ceil(K * bits / 8)], "
                         f"got {shape}")
    _expect("qdata", qdata, (qdata.shape[0], packed_row_bytes(in_features, bits)), (torch.uint8,))
    if bits == 8:
        return qdata[:, :in_features]
    low = qdata & 0x0F
    high = qdata >> 4
    codes = torch.stack((low, high), dim=-1).reshape(qdata.shape[0], -1)
    return codes[:, :in_features]


# ----------------------------------------------------------------------------------------
# Checks shared by the format, quantization and the matmul entry points.
# ----------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    # torch.SymInt: sizes traced symbolically (torch.compile, opcheck's dynamic-shape tests).
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> None:
    """Raises TypeError / ValueError unless ``value`` is an int > 0."""
    if not _is_int(value):
        raise TypeError(f"{name}: expected a positive int, got {value!r} "
                        f"({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")


def check_bits(bits: int) -> None:
    if not _is_int(bits):
        raise TypeError(f"bits: expected an int, one of {SUPPORTED_BITS}, got {bits!r} "
                        f"({type(bits).__name__})")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: expected one of {SUPPORTED_BITS}, got {bits!r}")


def check_group_size(group_size: int, in_features: Optional[int] = None) -> None:
    if not _is_int(group_size):
        raise TypeError(f"group_size: expected an int, one of {SUPPORTED_GROUP_SIZES}, got "
                        f"{group_size!r} ({type(group_size).__name__})")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size: expected one of {SUPPORTED_GROUP_SIZES} (-1 = per-channel), "
            f"got {group_size!r}")
    if in_features is not None and group_size != -1 and in_features % group_size:
        raise ValueError(
            f"group_size: expected a divisor of in_features={in_features}, got {group_size} "
            f"({in_features} % {group_size} = {in_features % group_size}); use a smaller "
            f"group size or group_size=-1 (per-channel)")


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def _expect(name: str, tensor: torch.Tensor, shape: Tuple[int, ...], dtypes) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {tensor.dtype}")


def _holds_readable_data(t: torch.Tensor) -> bool:
    """False where reading values is impossible or not allowed: meta tensors, tracing by
    torch.compile, CUDA graph capture. Value checks are skipped there."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


# ----------------------------------------------------------------------------------------
# The QuantizedWeight container.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class QuantizedWeight:
    """A quantized [out_features, in_features] weight in the canonical kpack-v1 format.

    Construct it with :func:`dqgemm.quantize`, an importer in :mod:`dqgemm.formats`, or
    directly from tensors. The constructor validates metadata, shapes, dtypes and devices,
    and, unless the tensors are on the meta device (or being traced or captured), that
    scales / zero_points / offsets are finite and g_idx names existing groups.
    """

    qdata: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    zero_points: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None
    g_idx: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.validate()

    # -- metadata ---------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.qdata.shape[0]

    @property
    def shape(self) -> Tuple[int, int]:
        """(out_features, in_features), the shape of the dequantized weight."""
        return (self.out_features, self.in_features)

    @property
    def num_groups(self) -> int:
        return num_groups(self.in_features, self.group_size)

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None and self.offsets is None

    @property
    def zero_mode(self) -> str:
        """"symmetric", "zero_points" or "offsets": which dequantization formula applies."""
        if self.zero_points is not None:
            return "zero_points"
        if self.offsets is not None:
            return "offsets"
        return "symmetric"

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        """Bytes held by all tensors of the weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def __repr__(self) -> str:
        act = ", act_order" if self.g_idx is not None else ""
        return (f"QuantizedWeight(shape={self.shape}, bits={self.bits}, "
                f"group_size={self.group_size}, {self.zero_mode}, "
                f"scales={str(self.scales.dtype).replace('torch.', '')}{act}, "
                f"device={self.device})")

    # -- validation -------------------------------------------------------------------
    def validate(self) -> None:
        """Checks metadata, shapes, dtypes and devices, then (where the tensors hold data) that
        scales / zero_points / offsets are finite and g_idx names existing groups."""
        check_bits(self.bits)
        check_positive_int("in_features", self.in_features)
        check_group_size(self.group_size, self.in_features)
        if not isinstance(self.qdata, torch.Tensor) or self.qdata.dim() != 2:
            shape = tuple(self.qdata.shape) if isinstance(self.qdata, torch.Tensor) else None
            raise ValueError(f"qdata: expected a 2-D uint8 tensor, got shape {shape}")
        n = self.qdata.shape[0]
        g = self.num_groups
        _expect("qdata", self.qdata, (n, packed_row_bytes(self.in_features, self.bits)),
                (torch.uint8,))
        _expect("scales", self.scales, (n, g), SCALE_DTYPES)
        if self.zero_points is not None and self.offsets is not None:
            raise ValueError("zero_points, offsets: expected at most one of them, got both")
        if self.zero_points is not None:
            _expect("zero_points", self.zero_points, (n, g), SCALE_DTYPES)
        if self.offsets is not None:
            _expect("offsets", self.offsets, (n, g), SCALE_DTYPES)
        if self.g_idx is not None:
            _expect("g_idx", self.g_idx, (self.in_features,), (torch.int32,))
        devices = {name: t.device for name, t in self.tensors().items()}
        if len(set(devices.values())) > 1:
            listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
            raise ValueError(f"QuantizedWeight tensors: expected one device, got {listing}")
        if _holds_readable_data(self.qdata):
            self.check_finite()
            self.check_g_idx_range()

    def check_finite(self) -> None:
        """Checks that scales, zero_points and offsets hold no NaN or Inf (a full scan)."""
        for name in ("scales", "zero_points", "offsets"):
            t = getattr(self, name)
            if t is None or t.numel() == 0:
                continue
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                first = tuple((~finite).nonzero()[0].tolist())
                raise ValueError(
                    f"{name}: expected finite values, got {int((~finite).sum())} NaN/Inf "
                    f"entries (first at index {first}: {t[first].item()})")

    def check_g_idx_range(self) -> None:
        """Checks that every g_idx entry names an existing group (a full scan of g_idx)."""
        if self.g_idx is None or self.g_idx.numel() == 0:
            return
        lo, hi = int(self.g_idx.min()), int(self.g_idx.max())
        if lo < 0 or hi >= self.num_groups:
            raise ValueError(
                f"g_idx: expected values in [0, {self.num_groups - 1}] "
                f"({self.num_groups} groups), got range [{lo}, {hi}]")

    # -- conversion -------------------------------------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        """The tensors that define the weight, by name (absent optional ones left out)."""
        out = {}
        for name in TENSOR_FIELDS:
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    def metadata(self) -> Dict[str, str]:
        """String metadata (safetensors-compatible) that, with tensors(), rebuilds the weight."""
        return {"format": FORMAT_NAME, "bits": str(self.bits),
                "group_size": str(self.group_size), "in_features": str(self.in_features)}

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]
                     ) -> "QuantizedWeight":
        fmt = metadata.get("format", FORMAT_NAME)
        if fmt != FORMAT_NAME:
            raise ValueError(f"metadata['format']: expected {FORMAT_NAME!r}, got {fmt!r}")
        missing = [k for k in ("qdata", "scales") if k not in tensors]
        if missing:
            raise ValueError(f"tensors: missing required tensor(s) {missing}")
        return cls(bits=int(metadata["bits"]), group_size=int(metadata["group_size"]),
                   in_features=int(metadata["in_features"]),
                   **{k: tensors.get(k) for k in TENSOR_FIELDS})

    def replace(self, **changes) -> "QuantizedWeight":
        return dataclasses.replace(self, **changes)

    def to(self, device=None, scale_dtype: Optional[torch.dtype] = None) -> "QuantizedWeight":
        """Moves every tensor to ``device``; optionally casts scales/zero_points/offsets."""
        def move(name, t):
            if t is None:
                return None
            if scale_dtype is not None and name in ("scales", "zero_points", "offsets"):
                t = t.to(dtype=scale_dtype)
            return t.to(device) if device is not None else t
        return self.replace(**{k: move(k, getattr(self, k)) for k in TENSOR_FIELDS})

    def cuda(self, device=None) -> "QuantizedWeight":
        return self.to(torch.device("cuda") if device is None else device)

    def cpu(self) -> "QuantizedWeight":
        return self.to(torch.device("cpu"))

    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 [N, K]."""
        return unpack_codes(self.qdata, self.bits, self.in_features)

    def group_index(self) -> torch.Tensor:
        """The group of each input column, int64 [K]."""
        if self.g_idx is not None:
            return self.g_idx.long()
        gs = effective_group_size(self.in_features, self.group_size)
        return torch.arange(self.in_features, device=self.device) // gs

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [N, K] weight in ``dtype`` (computed in fp32, pure PyTorch)."""
        from .reference import dequantize
        return dequantize(self, dtype)
