"""Triton family "dequant": dequantize W into a dense buffer with Triton, then cuBLAS.

What it computes: a Triton kernel writes W^T [K, N] (x's dtype, row-major, i.e. contiguous
along N like the packed words, so loads and stores are both coalesced without a
transpose) into a workspace cached per (device, dtype, size); then torch.mm / torch.addmm
(cuBLAS on a GPU) computes y = x @ W^T (+ bias) into the output. For act-order weights x
is gathered once, x[:, perm], into a second cached workspace (index_select(out=)).

Cost: the extra pass reads K*N*bits/8 and writes K*N*2 bytes (~0.2 ms for 8192 x 28672 on
an H100), so it pays off only where the GEMM itself is long (prefill, large M); there it
runs at cuBLAS efficiency, which a fused Triton kernel does not reach on Hopper.

Tiles: one program dequantizes [BLOCK_KW words = BLOCK_K codes, BLOCK_N] with the 2**23
magic (no int->float conversions) and stores it as a [BLOCK_KW, E, BLOCK_N] block.
Memory: the workspace (K*N*2 bytes per distinct layer size) stays allocated.
Test: tests/test_triton.py. Benchmark: bench/triton_tune.py.
"""

from __future__ import annotations

import torch

from .triton_common import tl, triton, workspace

if triton is not None:

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, GS,
                        BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        E: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        MAGIC: tl.constexpr = 0x4B000000  # bits of 2.0**23
        SYM_BIAS: tl.constexpr = 8388608.0 + (1 << (BITS - 1))
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        r = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
        mask_rn = (r < KW)[:, None] & mask_n[None, :]
        words = tl.load(w_ptr + r[:, None] * N + offs_n[None, :], mask=mask_rn, other=0)
        gofs = ((r * E) // GS)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + gofs, mask=mask_rn, other=0.0).to(tl.float32)[:, None, :]
        j = tl.arange(0, E)
        qf3 = (((words[:, None, :] >> (j * BITS)[None, :, None]) & MASK) | MAGIC).to(
            tl.float32, bitcast=True)
        if ZERO_MODE == 0:
            w3 = (qf3 - SYM_BIAS) * s
        elif ZERO_MODE == 1:
            z = tl.load(z_ptr + gofs, mask=mask_rn, other=0.0)[:, None, :]
            w3 = ((qf3 - 8388608.0) - z) * s
        else:
            z = tl.load(z_ptr + gofs, mask=mask_rn, other=0.0)[:, None, :]
            w3 = (qf3 - 8388608.0) * s + z
        k3 = r[:, None, None] * E + j[None, :, None]
        tl.store(out_ptr + k3 * N + offs_n[None, None, :], w3.to(out_ptr.dtype.element_ty),
                 mask=(k3 < K) & mask_n[None, None, :])


_DENSE = {}
_GATHER = {}


def _cached(store, device, dtype, shape):
    numel = 1
    for v in shape:
        numel *= v
    key = (device.type, -1 if device.index is None else device.index, dtype, numel)
    buf = store.get(key)
    if buf is None:
        buf = torch.empty(numel, dtype=dtype, device=device)
        store[key] = buf
    return buf.view(*shape)


def constexprs(cfg, bits, zero_mode, act_order=False, group_per_step=False, has_bias=False,
               use_ws=False):
    """The dequantize kernel's compile-time arguments (act-order, bias and the group
    layout are handled outside it; also used by bench/triton_aot_check.py)."""
    del act_order, group_per_step, has_bias, use_ws
    return dict(BITS=bits, ZERO_MODE=zero_mode, BLOCK_N=cfg.block_n,
                BLOCK_KW=max(1, cfg.block_k // (32 // bits)))


def dequantize_transposed(args, dtype, device, cfg):
    """W^T [K, N] in ``dtype`` (a cached workspace, overwritten by each call)."""
    e = 32 // args.bits
    block_kw = max(1, cfg.block_k // e)
    kw = args.packed.shape[0]
    wt = _cached(_DENSE, device, dtype, (args.k, args.n))
    grid = (-(-args.n // cfg.block_n), -(-kw // block_kw))
    _dequant_kernel[grid](
        args.packed, args.scales, args.zeros if args.zeros is not None else args.scales, wt,
        args.n, args.k, kw, args.group_size, **constexprs(cfg, args.bits, args.zero_mode),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return wt


def launch(x, args, bias, cfg, out):
    """x [M, K] contiguous; out [M, N] contiguous in x.dtype (written, also returned)."""
    wt = dequantize_transposed(args, x.dtype, x.device, cfg)
    if args.perm is not None:
        xg = _cached(_GATHER, x.device, x.dtype, tuple(x.shape))
        torch.index_select(x, 1, args.perm, out=xg)
        x = xg
    if bias is None:
        torch.mm(x, wt, out=out)
    else:
        torch.addmm(bias.to(x.dtype), x, wt, out=out)
    return out
