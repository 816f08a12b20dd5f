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
