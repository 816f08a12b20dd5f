"""The elementwise parts of the end-to-end decode benchmark (dqgemm.bench.e2e), fused.

One decode step of a Llama layer at batch 1-32 is 4 weight-streaming matmuls and a long
tail of tiny elementwise kernels (norms, residual adds, RoPE, KV-cache writes, SiLU). In
plain torch those are ~35 launches per layer, and inside a CUDA graph each still costs
~2 us: on an H200 that tail was ~3 ms of the 6.9 ms FP16 step of Llama-3-8B, more than the
INT4 matmuls themselves. Serving stacks fuse them; so does this benchmark, identically for
the FP16 and the quantized variants (measured: FP16 7.07 -> 5.14 ms per step, INT4 1.36x ->
1.57x FP16 at batch 1; bench/results/NOTES.md, "End-to-end decode: the elementwise tail"):

- ``add_rmsnorm(x, residual, weight, eps)``: h = x + residual (the residual stream, in the
  activation dtype as torch adds it), y = rmsnorm(h) * weight; one launch per call.
- ``rope_to_cache(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv_heads)``: splits the
  fused QKV projection, rotates q and k (half-split RoPE), writes k and v into the static
  caches at ``pos`` (a device tensor, so a captured graph advances it) and returns q as
  [B, n_heads, head_dim]; one launch.
- ``silu_mul(gate_up)``: silu(gate) * up of a fused gate+up projection; one launch.

Each op has a Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 for the
tests) and a torch implementation with the benchmark's original arithmetic (CPU runs, and
the oracle of tests/test_e2e_ops.py). The Triton kernels compute in fp32 and round once, so
they differ from the torch ops (which round after every fp16 operation) by ~1 ulp.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:  # optional, like the Triton backend
    import triton
    import triton.language as tl
    TRITON_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

IMPLS = ("triton", "torch")


def default_impl(device: torch.device) -> str:
    """"triton" where its kernels run natively (CUDA with triton), else "torch"."""
    return "triton" if device.type == "cuda" and TRITON_ERROR is None else "torch"


def check_impl(impl: str, device: torch.device) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        if TRITON_ERROR is not None:
            raise RuntimeError(f"impl='triton': {TRITON_ERROR}")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"impl='triton' on a {device.type} tensor needs "
                               "TRITON_INTERPRET=1 (set before importing dqgemm)")


# ----------------------------------------------------------------------------------------
# torch implementations (the benchmark's original arithmetic).
# ----------------------------------------------------------------------------------------

def _rmsnorm_torch(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return hf.to(h.dtype) * weight


def _rope_torch(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    t1, t2 = t[..., :half], t[..., half:]
    return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), dim=-1).to(t.dtype)


# ----------------------------------------------------------------------------------------
# Triton kernels.
# ----------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, h_ptr, y_ptr, hidden, eps,
                            HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        # one program per row; the whole row in registers (hidden <= BLOCK)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < hidden
        x = tl.load(x_ptr + row * hidden + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row * hidden + offs, mask=mask, other=0.0)
            h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(h_ptr + row * hidden + offs, h, mask=mask)
        else:
            h = x
        hf = h.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / hidden + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * hidden + offs, (hf * inv * w).to(x.dtype), mask=mask)

    @triton.jit
    def _rope_to_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr,
                              v_cache_ptr, n_heads, n_kv, cache_len,
                              HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
        # one program per (sequence, head of the fused q | k | v layout)
        b = tl.program_id(0)
        head = tl.program_id(1)
        offs = tl.arange(0, HALF)
        src = qkv_ptr + (b * (n_heads + 2 * n_kv) + head) * HEAD_DIM
        t1 = tl.load(src + offs)
        t2 = tl.load(src + HALF + offs)
        pos = tl.load(pos_ptr)
        if head < n_heads + n_kv:  # q or k: rotate
            c = tl.load(cos_ptr + offs).to(tl.float32)
            s = tl.load(sin_ptr + offs).to(tl.float32)
            a = t1.to(tl.float32)
            d = t2.to(tl.float32)
            r1 = (a * c - d * s).to(t1.dtype)
            r2 = (d * c + a * s).to(t1.dtype)
            if head < n_heads:
                dst = q_ptr + (b * n_heads + head) * HEAD_DIM
            else:
                dst = k_cache_ptr + ((b * n_kv + head - n_heads) * cache_len + pos) * HEAD_DIM
            tl.store(dst + offs, r1)
            tl.store(dst + HALF + offs, r2)
        else:  # v: copy into the cache
            dst = v_cache_ptr + ((b * n_kv + head - n_heads - n_kv) * cache_len + pos) * HEAD_DIM
            tl.store(dst + offs, t1)
            tl.store(dst + HALF + offs, t2)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(gu_ptr + row * 2 * inter + offs, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * 2 * inter + inter + offs, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        out = gf / (1.0 + tl.exp(-gf)) * u.to(tl.float32)
        tl.store(out_ptr + row * inter + offs, out.to(g.dtype), mask=mask)


# ----------------------------------------------------------------------------------------
# Public ops.
# ----------------------------------------------------------------------------------------

def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    return t.view(-1, t.shape[-1])


def add_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                eps: float, impl: str = "torch") -> Tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + residual (x when residual is None), y = rmsnorm(h) * weight."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight: expected shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual: expected shape {tuple(x.shape)}, got "
                         f"{tuple(residual.shape)}")
    if impl == "torch":
        h = x if residual is None else x + residual
        return h, _rmsnorm_torch(h, weight, eps)
    check_impl(impl, x.device)
    hidden = x.shape[-1]
    xr = _rows(x, "x")
    h = x if residual is None else torch.empty_like(x)
    y = torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    _add_rmsnorm_kernel[(xr.shape[0],)](
        xr, _rows(residual, "residual") if residual is not None else xr, weight, h, y,
        hidden, eps, HAS_RES=residual is not None, BLOCK=block,
        num_warps=8 if block >= 2048 else 4)
    return h, y


def rope_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  n_heads: int, n_kv_heads: int, impl: str = "torch") -> torch.Tensor:
    """q [B, n_heads, d] rotated; k (rotated) and v written to the caches at ``pos``.

    qkv: [B, 1, (n_heads + 2 n_kv_heads) * d]; cos, sin: [1, d / 2] (the rows of
    position ``pos``); pos: int64 [1] on the device; caches: [B, n_kv_heads, S, d].
    """
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    if qkv.shape[-1] != (n_heads + 2 * n_kv_heads) * d:
        raise ValueError(f"qkv: expected last dim {(n_heads + 2 * n_kv_heads) * d}, got "
                         f"{qkv.shape[-1]}")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (b, n_kv_heads):
        raise ValueError(f"k_cache/v_cache: expected [{b}, {n_kv_heads}, S, {d}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if impl == "torch":
        q, k, v = qkv.view(b, n_heads + 2 * n_kv_heads, d).split(
            (n_heads, n_kv_heads, n_kv_heads), dim=1)
        q, k = _rope_torch(q, cos, sin), _rope_torch(k, cos, sin)
        k_cache.index_copy_(2, pos, k.unsqueeze(2))
        v_cache.index_copy_(2, pos, v.unsqueeze(2))
        return q
    check_impl(impl, qkv.device)
    if d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"head_dim: the Triton kernel needs an even power of two, got {d}")
    for name, t in (("qkv", qkv), ("k_cache", k_cache), ("v_cache", v_cache), ("cos", cos),
                    ("sin", sin)):
        _rows(t, name)
    q = torch.empty(b, n_heads, d, device=qkv.device, dtype=qkv.dtype)
    _rope_to_cache_kernel[(b, n_heads + 2 * n_kv_heads)](
        qkv, cos, sin, pos, q, k_cache, v_cache, n_heads, n_kv_heads, k_cache.shape[2],
        HEAD_DIM=d, HALF=d // 2, num_warps=1)
    return q


def silu_mul(gate_up: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """silu(gate) * up, with gate and up the two halves of the last dim of ``gate_up``."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up: expected an even last dim, got {gate_up.shape[-1]}")
    if impl == "torch":
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    check_impl(impl, gate_up.device)
    inter = gate_up.shape[-1] // 2
    rows = _rows(gate_up, "gate_up")
    out = torch.empty(*gate_up.shape[:-1], inter, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
        rows, out, inter, BLOCK=block, num_warps=4)
    return out
