"""The matmul entry point: validation, the torch.library custom op, and dispatch.

``dqgemm.matmul(x, qweight, bias, backend)`` validates its arguments in Python, then calls
the custom op ``torch.ops.dqgemm.matmul`` with the canonical tensors. Inside the op (opaque
to torch.compile, which sees only its fake implementation) the registry picks a kernel for
the real M, the kernel's prepared weight layout is fetched from a cache (built on the first
call, so capture a CUDA graph after one warm-up call), and the kernel runs.

Gradients flow to x (and bias): dX = dY @ W, with W dequantized; the weight is frozen.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import launch, registry
from .format import QuantizedWeight
from .reference import dequantize_tensors

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------
# Validation (Python side, before the op).
# ----------------------------------------------------------------------------------------

def check_activation(x, in_features: int, weight_device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected shape [..., {in_features}] (last dim = in_features), "
            f"got {tuple(x.shape)}")
    if x.device != weight_device:
        raise ValueError(
            f"x: expected device {weight_device} (where the quantized weight is), "
            f"got {x.device}")


def check_bias(bias, out_features: int, device: torch.device) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    if not bias.dtype.is_floating_point:
        raise TypeError(f"bias: expected a floating-point dtype, got {bias.dtype}")
    if bias.device != device:
        raise ValueError(f"bias: expected device {device}, got {bias.device}")


def check_backend(backend: str) -> None:
    if backend not in registry.BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {registry.BACKEND_CHOICES}, got {backend!r}")


# ----------------------------------------------------------------------------------------
# Dispatch and the prepared-layout cache (inside the op).
# ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _device_facts(device: torch.device) -> Tuple[str, Tuple[int, int]]:
    if device.type != "cuda":
        return "", (0, 0)
    return torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))


def make_problem(x2d: torch.Tensor, qdata, scales, zero_points, offsets, g_idx, bits: int,
                 group_size: int) -> registry.Problem:
    name, arch = _device_facts(x2d.device)
    zero_mode = ("zero_points" if zero_points is not None else
                 "offsets" if offsets is not None else "symmetric")
    return registry.Problem(
        m=x2d.shape[0], n=qdata.shape[0], k=x2d.shape[1], bits=bits, group_size=group_size,
        dtype=x2d.dtype, scale_dtype=scales.dtype, zero_mode=zero_mode,
        act_order=g_idx is not None, device_type=x2d.device.type, device_name=name, arch=arch,
        programmatic_launch=(x2d.device.type == "cuda"
                             and launch.programmatic_launch_enabled()))


@functools.lru_cache(maxsize=4096)
def _select_cached(problem: registry.Problem, backend: str) -> registry.Kernel:
    return registry.select(problem, backend)


def select_kernel(problem: registry.Problem, backend: str) -> registry.Kernel:
    """The kernel that serves ``problem`` (memoized: dispatch data is fixed per process)."""
    return _select_cached(problem, backend)


# qdata tensor -> {kernel name: (version stamp, PreparedWeight)}. Keyed weakly by the
# tensor object, so a freed weight frees its prepared copies; the version stamp (torch's
# in-place version counters) notices load_state_dict / copy_ into the same tensors.
_PREPARED: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _stamp(*tensors) -> Tuple:
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)


def prepared_for(kernel: registry.Kernel, qdata, scales, zero_points, offsets, g_idx,
                 bits: int, group_size: int, in_features: int) -> registry.PreparedWeight:
    if not kernel.caches_prepared:
        return registry.PreparedWeight(qdata, scales, zero_points, offsets, g_idx)
    stamp = _stamp(qdata, scales, zero_points, offsets, g_idx)
    per_kernel: Dict = _PREPARED.setdefault(qdata, {})
    key = kernel.prepared_key or kernel.name
    hit = per_kernel.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    qweight = QuantizedWeight(qdata=qdata, scales=scales, zero_points=zero_points,
                              offsets=offsets, g_idx=g_idx, bits=bits, group_size=group_size,
                              in_features=in_features)
    prepared = kernel.prepare(qweight)
    per_kernel[key] = (stamp, prepared)
    return prepared


def clear_prepared_cache() -> None:
    _PREPARED.clear()


# ----------------------------------------------------------------------------------------
# The custom op.
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("dqgemm::matmul", mutates_args=())
def _matmul_op(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
               zero_points: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
               g_idx: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
               group_size: int, backend: str) -> torch.Tensor:
    in_features = x.shape[-1]
    out_features = qdata.shape[0]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if x2d.shape[0] == 0:
        return x.new_empty(*lead, out_features)
    x2d = x2d.contiguous()
    problem = make_problem(x2d, qdata, scales, zero_points, offsets, g_idx, bits, group_size)
    kernel = select_kernel(problem, backend)
    prepared = prepared_for(kernel, qdata, scales, zero_points, offsets, g_idx, bits,
                            group_size, in_features)
    spec = registry.WeightSpec(bits=bits, group_size=group_size, in_features=in_features,
                               out_features=out_features)
    out = kernel.run(x2d, prepared, bias, spec)
    return out.reshape(*lead, out_features)


@_matmul_op.register_fake
def _matmul_fake(x, qdata, scales, zero_points, offsets, g_idx, bias, bits, group_size,
                 backend):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


def _setup_context(ctx, inputs, output):
    x, qdata, scales, zero_points, offsets, g_idx, bias, bits, group_size, backend = inputs
    ctx.save_for_backward(qdata, scales, zero_points, offsets, g_idx)
    ctx.meta = (bits, group_size, x.shape[-1], x.dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    qdata, scales, zero_points, offsets, g_idx = ctx.saved_tensors
    bits, group_size, in_features, x_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_tensors(qdata, scales, zero_points, offsets, g_idx, bits,
                                    group_size, in_features, torch.float32)
        grad_x = (grad_out.float() @ weight).to(x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
        grad_bias = grad_out.float().reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, grad_bias, None, None, None


_matmul_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------

def matmul_tensors(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                   zero_points: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                   g_idx: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
                   group_size: int, in_features: int, backend: str = "auto") -> torch.Tensor:
    """matmul on canonical tensors already known to be consistent (QuantLinear's path)."""
    check_backend(backend)
    check_activation(x, in_features, qdata.device)
    check_bias(bias, qdata.shape[0], qdata.device)
    return torch.ops.dqgemm.matmul(x, qdata, scales, zero_points, offsets, g_idx, bias, bits,
                                   group_size, backend)


def matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
           backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T + bias with W the dequantized ``qweight``.

    Args:
        x: [..., K] in float16, bfloat16 or float32 (float32 runs on the reference backend),
            on the weight's device. Any strides; any number of leading dims, including 0 rows.
        qweight: a QuantizedWeight [N, K].
        bias: optional [N].
        backend: "auto" (dispatch), "reference", "triton" or "cuda".

    Returns:
        [..., N] in x's dtype.
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight: expected a dqgemm.QuantizedWeight, got "
                        f"{type(qweight).__name__}")
    return matmul_tensors(x, qweight.qdata, qweight.scales, qweight.zero_points,
                          qweight.offsets, qweight.g_idx, bias, qweight.bits,
                          qweight.group_size, qweight.in_features, backend)


def explain(x: torch.Tensor, qweight: QuantizedWeight, backend: str = "auto") -> str:
    """Which kernel would serve this call, and why the others would not."""
    check_backend(backend)
    check_activation(x, qweight.in_features, qweight.device)
    x2d = x.reshape(-1, qweight.in_features)
    problem = make_problem(x2d, qweight.qdata, qweight.scales, qweight.zero_points,
                           qweight.offsets, qweight.g_idx, qweight.bits, qweight.group_size)
    lines = [f"problem: {problem}"]
    for kernel, reason in registry.candidates(problem, backend):
        lines.append(f"  {kernel.name:<24} {'ok' if reason is None else reason}")
    lines.append(f"selected: {registry.select(problem, backend).name}")
    return "\n".join(lines)
