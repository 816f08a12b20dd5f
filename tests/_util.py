"""Helpers shared by the tests: the error metric of the project's standard, poisoning."""

from __future__ import annotations

import torch

# Relative Frobenius error against a float64 product of the dequantized weight.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def reference_product(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """float64 x @ weight^T (+ bias), on the CPU."""
    out = x.detach().double().cpu() @ weight.detach().double().cpu().t()
    if bias is not None:
        out = out + bias.detach().double().cpu()
    return out


def rel_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    out = out.detach().double().cpu()
    expected = expected.detach().double().cpu()
    denom = expected.norm().item()
    return (out - expected).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_product(out, x, weight, bias=None, dtype=None):
    dtype = dtype or out.dtype
    err = rel_error(out, reference_product(x, weight, bias))
    assert torch.isfinite(out).all(), "output holds NaN/Inf"
    assert err <= TOLERANCE[dtype], f"relative Frobenius error {err:.3e} > {TOLERANCE[dtype]:.0e}"
    return err


def random_weight(n: int, k: int, dtype=torch.float32, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) * 0.02).to(dtype=dtype, device=device)


def random_activation(shape, dtype, seed: int = 1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def make_quantized(n: int, k: int, bits: int, group_size: int, mode: str = "symmetric",
                   seed: int = 0, act_order: bool = False, device="cuda"):
    """A quantized random weight in one of the canonical modes: "symmetric", "zero_points",
    "offsets" (float offsets instead of zero points) or "fractional_zero" (zero points
    that are not integers); with ``act_order``, a random g_idx permutation."""
    import dqgemm

    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
    qw = dqgemm.quantize(w, bits, group_size,
                         symmetric=mode not in ("zero_points", "fractional_zero"))
    if mode == "offsets":
        qw = qw.replace(offsets=(torch.randn(n, qw.num_groups, generator=gen) * 0.01)
                        .half().to(device))
    if mode == "fractional_zero":
        qw = qw.replace(zero_points=qw.zero_points.float() + 0.375)
    if act_order:
        perm = torch.randperm(k, generator=gen)
        gs = k if group_size == -1 else group_size
        g_idx = (torch.arange(k) // gs)[perm].to(torch.int32)
        qw = qw.replace(g_idx=g_idx.to(device))
    return qw


def capture_graph(fn):
    """A CUDA graph of fn() on the current device (dqgemm.bench.timing.capture_graph)."""
    from dqgemm.bench.timing import capture_graph as capture
    return capture(fn)
