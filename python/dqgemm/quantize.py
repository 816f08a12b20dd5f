"""Round-to-nearest quantization of a dense weight into the canonical format.

Symmetric:  scale = absmax / qmax with qmax = 2**(bits-1) - 1,
            q = clamp(round(w / scale), -qmax, qmax) + 2**(bits-1) (code 0, -qmax - 1, is
            valid in the format but never produced here: see below).
Asymmetric: the group's range is widened to include 0 (so an all-zero group stays exact),
            scale = (max - min) / (2**bits - 1), zero = round(-min / scale),
            q = clamp(round(w / scale) + zero, 0, 2**bits - 1).

The codes are always computed from the scale *after* it is rounded to its storage dtype.
Symmetric scales round up: no weight falls outside the grid, each is within half a step.
Where rounding up would leave the group's largest magnitude below code 2**(bits-1) - 1
(possible only where the scale dtype's steps are coarse against 1 / qmax: bf16 scales at
8 bits, whose steps reach 1/128 of the value, and fp16 scales in fp16's subnormal range,
below 6.1e-5), the scale rounds down instead, and the largest magnitude (of either sign)
clamps to code +-qmax, by less than qmax steps of the scale dtype (within half a
quantization step unless the dtype's step is coarser than that). So the largest magnitude
always lands on +-qmax, and re-quantizing stays lossless.
Asymmetric scales round down (towards zero), so the group's minimum lands exactly on code 0
and its maximum on the last code (clamped there by at most (2**bits - 1) * ulp(scale) steps,
about 0.007 of a step for INT4 with fp16 scales): every group spans the whole grid, which
makes re-quantizing a dequantized weight lossless. (A scale that would round down to 0, a
group spanning less than the dtype's least step, takes that least step instead; the group
then sits inside the grid and still re-quantizes to itself.)
float32 scales keep FP32_SCALE_BITS = 16 significant bits (rounded the same way), so that
every code * scale (codes span at most 8 bits) is exact in fp32 and re-quantizing a
dequantized weight gives back the same scales.

Offsets (``zero_mode="offsets"``, the GGUF Q4_1 scheme): min-max over the group,
            scale = (max - min) / (2**bits - 1), offset = min, q = round((w - offset) / scale);
            the offset rounds to nearest (up, where nearest would put the minimum on code
            1: bf16 at 8 bits), the scale to nearest (down, where nearest would leave the
            maximum short of the last code), so that re-quantizing is lossless here too.

The optional clipping search (``clip_search=True``) tries a few shrink factors of each
group's range and keeps, per group, the one with the least squared error. Shrinking
clips a few outliers and buys a finer step for all the other weights.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .format import (QuantizedWeight, check_bits, check_group_size, effective_group_size,
                     pack_codes)

DEFAULT_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
FP32_SCALE_BITS = 16


def _default_scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight: expected a 2-D [out_features, in_features] tensor, got shape "
            f"{tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight: expected a floating-point dtype, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty tensor, got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError("weight: expected a tensor holding values, got one on the meta device")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(
            f"weight: expected finite values, got {int((~finite).sum())} NaN/Inf entries "
            f"(first at index {tuple(bad)}: {weight[tuple(bad)].item()})")


def check_representable(name: str, values: torch.Tensor, dtype: torch.dtype) -> None:
    """Raises ValueError when fp32 ``values`` exceed what ``dtype`` (scale_dtype) can hold."""
    limit = torch.finfo(dtype).max
    largest = float(values.abs().max()) if values.numel() else 0.0
    if largest > limit:
        raise ValueError(
            f"scale_dtype: expected a dtype that holds the {name} (largest {largest:.4g}), "
            f"got {dtype} (max {limit:.4g}); use scale_dtype=torch.float32")


def _trim_fp32(exact: torch.Tensor, direction: str) -> torch.Tensor:
    """exact (fp32, >= 0) rounded to FP32_SCALE_BITS significant bits: "up", "down" or
    "nearest" (ties away from zero)."""
    drop = 24 - FP32_SCALE_BITS
    bits = exact.contiguous().view(torch.int32)
    if direction == "nearest":
        bits = bits + (1 << (drop - 1))
    low = bits & ((1 << drop) - 1)
    down = bits - low
    if direction == "up":
        down = torch.where(low != 0, down + (1 << drop), down)
    return down.view(torch.float32)


def _round_scale(exact: torch.Tensor, dtype: torch.dtype, direction: str) -> torch.Tensor:
    """exact (fp32, >= 0) rounded to ``dtype`` towards +inf ("up"), towards 0 ("down") or
    to nearest ("nearest"); float32 keeps FP32_SCALE_BITS significant bits."""
    check_representable("scales", exact, dtype)
    if dtype == torch.float32:
        return _trim_fp32(exact, direction)
    rounded = exact.to(dtype)
    if direction == "nearest":
        return rounded
    off = rounded.float() < exact if direction == "up" else rounded.float() > exact
    if not bool(off.any()):
        return rounded
    return torch.where(off, _neighbour(rounded, direction == "up"), rounded)


def _neighbour(rounded: torch.Tensor, up: bool) -> torch.Tensor:
    """fp16 / bf16 values one step towards +inf (up) or -inf: the adjacent bit pattern,
    +1 where that grows the value (positive going up, negative going down), else -1
    (+0.0 going up gives the smallest subnormal)."""
    bits = rounded.view(torch.int16)
    step = torch.where((bits >= 0) == up, 1, -1).to(torch.int16)
    return (bits + step).view(rounded.dtype)


def _round_up_signed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32, any sign, already checked representable) rounded towards +inf in fp16 /
    bf16 (fp32 values are kept as they are)."""
    if dtype == torch.float32:
        return x
    rounded = x.to(dtype)
    return torch.where(rounded.float() < x, _neighbour(rounded, True), rounded)


def _symmetric_scales(absmax: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """Rounded-up absmax / qmax, or rounded down where up would leave the largest magnitude
    short of code qmax (module docstring): either way the largest magnitude lands on code
    qmax, which is what makes re-quantizing lossless."""
    up = _round_scale(absmax / qmax, dtype, "up")
    short = absmax / up.float() <= qmax - 0.5          # NaN (absmax = 0) compares False
    if not bool(short.any()):
        return up
    return _down_unless_zero(short, absmax / qmax, dtype, up)


def _down_unless_zero(where: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                      other: torch.Tensor) -> torch.Tensor:
    """exact rounded down where ``where`` holds, except where that underflows to 0 (a
    group smaller than the dtype's least step): ``other`` there, so the group is not
    zeroed (it is re-quantized to the same scale again, as every group is)."""
    down = _round_scale(exact, dtype, "down")
    return torch.where(where & (down.float() > 0), down, other)


def _quantize_groups(w: torch.Tensor, bits: int, mode: str, scale_dtype: torch.dtype,
                     ratio: float):
    """w: fp32 [N, G, gs]. Returns (codes [N,G,gs], scales [N,G], zero_points, offsets)."""
    levels = (1 << bits) - 1
    if mode == "symmetric":
        qmax = (1 << (bits - 1)) - 1
        absmax = w.abs().amax(dim=-1) * ratio
        scales = _symmetric_scales(absmax, qmax, scale_dtype)
        s = scales.float()
        safe = torch.where(s == 0, torch.ones_like(s), s).unsqueeze(-1)
        # +-qmax: where the scale rounded down, the most negative weight must not reach
        # code -qmax - 1, or re-quantizing would see a larger absmax
        q = torch.clamp(torch.round(w / safe), -qmax, qmax) + (1 << (bits - 1))
        return q, scales, None, None
    if mode == "offsets":
        # Min-max over the group itself (GGUF Q4_1 style): w ~ q * scale + offset, offset = min.
        # The offset rounds to nearest (the minimum lands on code 0 up to that rounding) and
        # so does the scale, unless that leaves the top of the range short of the last code
        # by half a step (coarse scale dtypes: bf16, fp16 subnormals): then it rounds down and
        # the top clamps to the last code. Either way the group spans codes 0..levels, so
        # re-quantizing is lossless.
        wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)
        mid, half = (wmax + wmin) / 2, (wmax - wmin) / 2 * ratio
        # ratio 1: the minimum itself (mid - half is not exactly it in fp32)
        low = wmin if ratio == 1.0 else mid - half
        high = wmax if ratio == 1.0 else mid + half
        check_representable("offsets", low, scale_dtype)
        offsets = low.to(scale_dtype)
        span = 2 * half
        # An offset rounded down by half a step or more (bf16 at 8 bits: its steps reach
        # half a quantization step) would put the minimum on code 1: round it up instead,
        # and measure the range from there.
        below = (low - offsets.float()) * levels >= 0.5 * span * (1 - 1e-6)
        if bool(below.any()):
            offsets = torch.where(below, _round_up_signed(low, scale_dtype), offsets)
            span = torch.where(below, high - offsets.float(), span)
        scales = _round_scale(span / levels, scale_dtype, "nearest")
        top = (high - offsets.float()) / scales.float()
        short = top < levels - 0.5                     # NaN (scale 0) compares False
        if bool(short.any()):
            scales = _down_unless_zero(short, span / levels, scale_dtype, scales)
        s = scales.float()
        safe = torch.where(s == 0, torch.ones_like(s), s).unsqueeze(-1)
        q = torch.clamp(torch.round((w - offsets.float().unsqueeze(-1)) / safe), 0, levels)
        return q, scales, None, offsets
    wmin = w.amin(dim=-1).clamp(max=0) * ratio
    wmax = w.amax(dim=-1).clamp(min=0) * ratio
    exact = (wmax - wmin) / levels
    # down, except for a range below the dtype's least step: up (the least step) there
    scales = _down_unless_zero(exact > 0, exact, scale_dtype,
                               _round_scale(exact, scale_dtype, "up"))
    s = scales.float()
    safe = torch.where(s == 0, torch.ones_like(s), s)
    zeros = torch.clamp(torch.round(-wmin / safe), 0, levels)
    q = torch.clamp(torch.round(w / safe.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, levels)
    return q, scales, zeros.to(scale_dtype), None


def _dequant_groups(q, scales, zeros, offsets, bits):
    s = scales.float().unsqueeze(-1)
    if offsets is not None:
        return q * s + offsets.float().unsqueeze(-1)
    if zeros is None:
        return (q - (1 << (bits - 1))) * s
    return (q - zeros.float().unsqueeze(-1)) * s


def quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128,
             symmetric: bool = True, *, zero_mode: Optional[str] = None,
             scale_dtype: Optional[torch.dtype] = None,
             clip_search: bool = False,
             clip_ratios: Sequence[float] = DEFAULT_CLIP_RATIOS) -> QuantizedWeight:
    """Quantizes a 2-D [out_features, in_features] weight with round-to-nearest.

    Args:
        weight: float tensor [N, K], on any device (the result lives on the same device).
        bits: 4 or 8.
        group_size: 32, 64, 128, 256, or -1 for one scale per output channel. Must divide K.
        symmetric: True stores no zero points; False stores one per group.
        zero_mode: overrides ``symmetric``: "symmetric", "zero_points" (integer zero points,
            range widened to include 0), or "offsets" (min-max per group with a float offset,
            w = q * scale + offset, the GGUF Q4_1 scheme).
        scale_dtype: dtype of scales (and zero points); default fp16, or bf16 for a bf16
            weight. float32 scales keep FP32_SCALE_BITS significant bits (module docstring).
            A scale or offset beyond the dtype's range is a ValueError, never an Inf.
        clip_search: try each of ``clip_ratios`` per group and keep the least-squared-error one.

    Returns:
        A QuantizedWeight in the canonical kpack-v1 format.
    """
    check_bits(bits)
    for name, flag in (("symmetric", symmetric), ("clip_search", clip_search)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected True or False, got {flag!r} "
                            f"({type(flag).__name__})")
    _check_weight(weight)
    n, k = weight.shape
    check_group_size(group_size, k)
    if scale_dtype is None:
        scale_dtype = _default_scale_dtype(weight.dtype)
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"scale_dtype: expected float16, bfloat16 or float32, got {scale_dtype}")
    if clip_search and (not clip_ratios or any(not 0 < r <= 1 for r in clip_ratios)):
        raise ValueError(f"clip_ratios: expected a non-empty list in (0, 1], got {clip_ratios}")

    if zero_mode is None:
        zero_mode = "symmetric" if symmetric else "zero_points"
    if zero_mode not in ("symmetric", "zero_points", "offsets"):
        raise ValueError(f"zero_mode: expected 'symmetric', 'zero_points' or 'offsets', "
                         f"got {zero_mode!r}")
    gs = effective_group_size(k, group_size)
    w = weight.detach().float().reshape(n, k // gs, gs)
    ratios = clip_ratios if clip_search else (1.0,)
    best = None
    for ratio in ratios:
        q, scales, zeros, offsets = _quantize_groups(w, bits, zero_mode, scale_dtype, ratio)
        err = (_dequant_groups(q, scales, zeros, offsets, bits) - w).pow(2).sum(dim=-1)
        if best is None:
            best = [q, scales, zeros, offsets, err]
            continue
        better = err < best[4]
        best[0] = torch.where(better.unsqueeze(-1), q, best[0])
        for i, t in ((1, scales), (2, zeros), (3, offsets), (4, err)):
            if t is not None:
                best[i] = torch.where(better, t, best[i])
    q, scales, zeros, offsets, _ = best
    codes = q.reshape(n, k).to(torch.uint8)

    def contiguous(t):
        return None if t is None else t.contiguous()
    return QuantizedWeight(qdata=pack_codes(codes, bits), scales=scales.contiguous(),
                           zero_points=contiguous(zeros), offsets=contiguous(offsets),
                           bits=bits, group_size=group_size, in_features=k)
