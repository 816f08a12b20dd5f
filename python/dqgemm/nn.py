"""QuantLinear, a drop-in nn.Linear with a quantized weight, and quantize_model.

QuantLinear holds the canonical kpack-v1 tensors as buffers (qdata, scales and, where
present, zero_points / offsets / g_idx), so state_dict, safetensors and ``.to()`` work as
for any module. Casting the module (``.half()``, ``.to(torch.bfloat16)``) casts the bias
only: the quantization tensors keep their dtype, because re-rounding scales would silently
change the weight. For the same reason ``load_state_dict`` takes scales, zero points and
offsets in the dtype they were saved in (and then validates the loaded weight). The
activation dtype of each call decides the compute dtype.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import ops
from .format import (SCALE_DTYPES, QuantizedWeight, check_bits, check_group_size,
                     check_positive_int, num_groups, packed_row_bytes)
from .quantize import quantize

QUANT_BUFFERS = ("qdata", "scales", "zero_points", "offsets", "g_idx")
SCALE_BUFFERS = ("scales", "zero_points", "offsets")


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored quantized (INT4/INT8, kpack-v1).

    Build one from a float layer with :meth:`from_linear`, from a QuantizedWeight with
    :meth:`from_quantized`, or empty (then ``load_state_dict``) with the constructor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 bits: int = 4, group_size: int = 128, symmetric: bool = True,
                 zero_mode: Optional[str] = None, act_order: bool = False,
                 scale_dtype: torch.dtype = torch.float16, backend: str = "auto",
                 device=None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_bits(bits)
        check_group_size(group_size, in_features)
        ops.check_backend(backend)
        if zero_mode is None:
            zero_mode = "symmetric" if symmetric else "zero_points"
        if zero_mode not in ("symmetric", "zero_points", "offsets"):
            raise ValueError(f"zero_mode: expected 'symmetric', 'zero_points' or 'offsets', "
                             f"got {zero_mode!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.backend = backend
        groups = num_groups(in_features, group_size)
        self.register_buffer("qdata", torch.zeros(
            out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype,
                                                  device=device))
        for name in ("zero_points", "offsets"):
            tensor = (torch.zeros(out_features, groups, dtype=scale_dtype, device=device)
                      if zero_mode == name else None)
            self.register_buffer(name, tensor)
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32,
                                                   device=device) // (group_size if group_size > 0
                                                                      else in_features)
                             if act_order else None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device,
                                                 dtype=dtype or torch.float32),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       backend: str = "auto") -> "QuantLinear":
        module = cls(qweight.in_features, qweight.out_features, bias=bias is not None,
                     bits=qweight.bits, group_size=qweight.group_size,
                     zero_mode=qweight.zero_mode, act_order=qweight.g_idx is not None,
                     scale_dtype=qweight.scales.dtype, backend=backend, device="meta")
        for name in QUANT_BUFFERS:
            tensor = getattr(qweight, name)
            setattr(module, name, None if tensor is None else tensor.detach())
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = True, backend: str = "auto", **quantize_kwargs
                    ) -> "QuantLinear":
        """Quantizes ``linear.weight`` exactly as ``dqgemm.quantize`` with the same arguments."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        qweight = quantize(linear.weight.detach(), bits=bits, group_size=group_size,
                           symmetric=symmetric, **quantize_kwargs)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_quantized(qweight, bias, backend=backend)

    # -- views ----------------------------------------------------------------------------
    def quantized_weight(self) -> QuantizedWeight:
        """The weight as a (validated) QuantizedWeight sharing this module's tensors."""
        return QuantizedWeight(qdata=self.qdata, scales=self.scales, zero_points=self.zero_points,
                               offsets=self.offsets, g_idx=self.g_idx, bits=self.bits,
                               group_size=self.group_size, in_features=self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for name in QUANT_BUFFERS
                   if (t := getattr(self, name)) is not None)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.matmul_tensors(x, self.qdata, self.scales, self.zero_points, self.offsets,
                                  self.g_idx, self.bias, self.bits, self.group_size,
                                  self.in_features, self.backend)

    # -- module plumbing ------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # Move quantization tensors with the module, but never change their dtype.
        saved = {name: self._buffers[name] for name in QUANT_BUFFERS
                 if self._buffers.get(name) is not None}
        for name in saved:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in saved.items():
                moved = fn(tensor)
                if moved.dtype != tensor.dtype:
                    moved = tensor.to(moved.device)
                self._buffers[name] = moved
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Quantization tensors are taken in the dtype they were saved in (copying fp32 scales
        # into fp16 buffers would silently change the weight); the result is validated.
        for name in QUANT_BUFFERS:
            incoming = state_dict.get(prefix + name)
            own = self._buffers.get(name)
            if (not isinstance(incoming, torch.Tensor) or own is None
                    or incoming.dtype == own.dtype):
                continue
            _check_loaded_dtype(prefix + name, name, incoming.dtype, own.dtype)
            if name in SCALE_BUFFERS:
                self._buffers[name] = torch.empty_like(own, dtype=incoming.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not error_msgs:
            self.quantized_weight()   # raises on NaN/Inf scales, a bad g_idx, ...

    def extra_repr(self) -> str:
        mode = ("symmetric" if self.zero_points is None and self.offsets is None else
                "zero_points" if self.zero_points is not None else "offsets")
        act = ", act_order=True" if self.g_idx is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"{mode}{act}, backend={self.backend!r}")


def _check_loaded_dtype(key: str, name: str, got: torch.dtype, have: torch.dtype) -> None:
    """Raises unless a saved tensor of dtype ``got`` may be loaded into buffer ``name``:
    scales-like buffers take any of SCALE_DTYPES (adopted as saved), g_idx any integer
    dtype (converted to int32), qdata only uint8."""
    if name in SCALE_BUFFERS:
        if got not in SCALE_DTYPES:
            raise TypeError(f"{key}: expected float16, bfloat16 or float32, got {got}")
    elif name == "g_idx":
        if got.is_floating_point or got.is_complex or got == torch.bool:
            raise TypeError(f"{key}: expected an integer dtype (int32), got {got}")
    else:
        raise TypeError(f"{key}: expected dtype {have}, got {got}")


# ----------------------------------------------------------------------------------------
# Whole models.
# ----------------------------------------------------------------------------------------

def format_bytes(nbytes: int) -> str:
    """1536 -> "1.50 KiB": the largest binary unit that keeps the number >= 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


@dataclasses.dataclass
class QuantizationSummary:
    """What quantize_model did."""

    quantized: List[str] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, why)
    bytes_before: int = 0   # weights of the layers that were quantized, before
    bytes_after: int = 0    # the same layers' quantized tensors

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} linear layers, skipped {len(self.skipped)}",
                 f"weight memory of quantized layers: {format_bytes(self.bytes_before)} -> "
                 f"{format_bytes(self.bytes_after)}"
                 + (f" ({self.bytes_before / self.bytes_after:.2f}x smaller)"
                    if self.bytes_after else "")]
        for name, why in self.skipped:
            lines.append(f"  skipped {name}: {why}")
        return "\n".join(lines)


def _skip_reason(name: str, module: nn.Linear, group_size: int,
                 filter: Optional[Callable[[str, nn.Module], bool]],
                 skip: Iterable[str]) -> Optional[str]:
    if name == "":
        return "the model itself is an nn.Linear: use QuantLinear.from_linear"
    if type(module) is not nn.Linear:
        return (f"{type(module).__name__} is a subclass of nn.Linear (its forward or its "
                f"users may rely on .weight): not replaced")
    for pattern in skip:
        if fnmatch.fnmatchcase(name, pattern) or name == pattern:
            return f"matches skip pattern {pattern!r}"
    if filter is not None and not filter(name, module):
        return "rejected by filter"
    if group_size != -1 and module.in_features % group_size:
        return (f"in_features={module.in_features} not divisible by "
                f"group_size={group_size}")
    if module.weight.device.type == "meta":
        return "weight is on the meta device"
    return None


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128,
                   filter: Optional[Callable[[str, nn.Module], bool]] = None,
                   skip: Iterable[str] = (), *, symmetric: bool = True, backend: str = "auto",
                   progress: Optional[bool] = None, verbose: bool = False,
                   **quantize_kwargs) -> QuantizationSummary:
    """Replaces every eligible nn.Linear of ``model`` with a QuantLinear, in place.

    Eligible: a plain nn.Linear (not a subclass) whose in_features group_size divides, not
    on the meta device, not matched by ``skip``, accepted by ``filter``. Every other
    nn.Linear (subclasses included) is listed in the summary's ``skipped`` with the reason.

    Args:
        bits, group_size, symmetric, quantize_kwargs: as for dqgemm.quantize.
        filter: ``filter(name, module) -> bool``; layers for which it is False are skipped.
        skip: module names or fnmatch patterns to leave alone (e.g. ``"lm_head"``).
        progress: show a tqdm progress bar (default: when there are 8 or more layers).
        verbose: print the summary.

    Returns:
        A QuantizationSummary (also printed with ``verbose=True``).
    """
    check_bits(bits)
    check_group_size(group_size)
    ops.check_backend(backend)
    skip = tuple(skip)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    summary = QuantizationSummary()
    show = progress if progress is not None else len(linears) >= 8
    iterator = linears
    if show:
        from tqdm.auto import tqdm
        iterator = tqdm(linears, desc=f"dqgemm: quantizing to INT{bits}", unit="layer")
    for name, module in iterator:
        reason = _skip_reason(name, module, group_size, filter, skip)
        if reason is not None:
            summary.skipped.append((name, reason))
            continue
        qlinear = QuantLinear.from_linear(module, bits=bits, group_size=group_size,
                                          symmetric=symmetric, backend=backend,
                                          **quantize_kwargs)
        summary.bytes_before += module.weight.numel() * module.weight.element_size()
        summary.bytes_after += qlinear.weight_nbytes
        _set_submodule(model, name, qlinear)
        summary.quantized.append(name)
    if verbose:
        print(summary)
    return summary


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
