"""Triton family "gemm": y = x @ dequant(W)^T for large M (prefill), one program per tile.

What it computes: BLOCK_M x BLOCK_N output tiles (grouped GROUP_M tile rows at a time so
that neighbouring programs share weight tiles in L2), a K loop of BLOCK_K steps, software
pipelined over num_stages. Layout: the Triton layout of triton_common.py.

Per step: x tile [BLOCK_M, BLOCK_K] (contiguous rows; act-order gathers columns through
the permutation), weight words loaded as a [BLOCK_K, BLOCK_N] tile whose row k reads word
k // E (E = 32 // bits codes per word: the same word feeds E rows, served by L1; at large M
the BLOCK_M-fold reuse of each dequantized code hides that), codes shifted out by
(k % E) * bits, dequantized in fp32 with the 2**23 magic (no int->float conversion) as
(q - z) * s (+ o), rounded once to the activation dtype, then one tl.dot.
Per element of the weight tile: shift, and-or, subtract, multiply, convert: the
dequantization competes with the mma for issue slots, which is why large BLOCK_M matters.

W_LHS (config option w_lhs): the same product computed transposed, out^T = W x^T, with the
dequantized weight tile as the dot's left operand. On Hopper, Triton lowers a dot whose LHS
is computed in registers to the register-A form of wgmma; with the weight on the right it
must first store the dequantized tile to shared memory (the SS form). Its words are loaded
once ([BLOCK_N, BLOCK_K // E]) and expanded by a reshape. Measured on the H200 and slower
than the dequant family everywhere (bench/results/NOTES.md, "Prefill"), so it is not a
tuning candidate; it stays tested (tests/test_triton.py, family "gemm_lhs").

Constraints: any M (meant for M > 64), any N, K.
Test: tests/test_triton.py. Benchmark: bench/triton_tune.py.
"""

from __future__ import annotations

from .triton_common import group_per_step, tl, triton

if triton is not None:

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr,
                     M, N, K, GS, stride_xm,
                     BITS: tl.constexpr, ZERO_MODE: tl.constexpr, ACT_ORDER: tl.constexpr,
                     GROUP_PER_STEP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, W_LHS: tl.constexpr):
        E: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        MAGIC: tl.constexpr = 0x4B000000  # bits of 2.0**23
        SYM_BIAS: tl.constexpr = 8388608.0 + (1 << (BITS - 1))
        DT = x_ptr.dtype.element_ty
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows_in_group
        pid_n = (pid % per_group) // rows_in_group
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        if W_LHS:
            # tiles [BLOCK_N, BLOCK_K] (weight) and [BLOCK_K, BLOCK_M] (x^T); acc = out^T.
            # The words are loaded once as [BLOCK_N, BLOCK_K // E] and expanded to
            # [BLOCK_N, BLOCK_K // E, E] -> [BLOCK_N, BLOCK_K] (code k = word * E + e)
            shifts = (tl.arange(0, E) * BITS)[None, None, :]
            kw = tl.arange(0, BLOCK_K // E)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            shifts = ((offs_k % E) * BITS)[:, None]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < K
            if ACT_ORDER:
                src = tl.load(perm_ptr + k, mask=mask_k, other=0)
            else:
                src = k
            if W_LHS:
                a = tl.load(x_ptr + offs_m[None, :] * stride_xm + src[:, None],
                            mask=mask_m[None, :] & mask_k[:, None], other=0.0)
                kws = k0 // E + kw
                mask_w = mask_n[:, None] & (kws < tl.cdiv(K, E))[None, :]
                w_offs = kws[None, :] * N + offs_n[:, None]
            else:
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :],
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                mask_w = mask_k[:, None] & mask_n[None, :]
                w_offs = (k // E)[:, None] * N + offs_n[None, :]
            words = tl.load(w_ptr + w_offs, mask=mask_w, other=0)
            if W_LHS:
                qf = tl.reshape(((words[:, :, None] >> shifts) & MASK) | MAGIC,
                                (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)
                mask_w = mask_n[:, None] & mask_k[None, :]
            else:
                qf = (((words >> shifts) & MASK) | MAGIC).to(tl.float32, bitcast=True)
            if GROUP_PER_STEP:
                g = k0 // GS
                s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                if ZERO_MODE != 0:
                    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0)
                if W_LHS:
                    s = s[:, None]
                    if ZERO_MODE != 0:
                        z = z[:, None]
                else:
                    s = s[None, :]
                    if ZERO_MODE != 0:
                        z = z[None, :]
            else:
                if W_LHS:
                    gofs = (k // GS)[None, :] * N + offs_n[:, None]
                else:
                    gofs = (k // GS)[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + gofs, mask=mask_w, other=0.0).to(tl.float32)
                if ZERO_MODE != 0:
                    z = tl.load(z_ptr + gofs, mask=mask_w, other=0.0)
            if ZERO_MODE == 0:
                w = (qf - SYM_BIAS) * s
            elif ZERO_MODE == 1:
                w = ((qf - 8388608.0) - z) * s
            else:
                w = (qf - 8388608.0) * s + z
            if W_LHS:
                acc = tl.dot(w.to(DT), a, acc)
            else:
                acc = tl.dot(a, w.to(DT), acc)
        if W_LHS:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None],
                     acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def constexprs(cfg, bits, zero_mode, act_order, group_per_step, has_bias, use_ws=False):
    """The kernel's compile-time arguments (also used by bench/triton_aot_check.py)."""
    del use_ws  # one program per tile: no split-K workspace
    return dict(BITS=bits, ZERO_MODE=zero_mode, ACT_ORDER=act_order,
                GROUP_PER_STEP=group_per_step, HAS_BIAS=has_bias, BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                W_LHS=cfg.w_lhs)


def launch(x, args, bias, cfg, out):
    """x [M, K] contiguous; out [M, N] contiguous in x.dtype (written, also returned)."""
    m = x.shape[0]
    grid = (-(-m // cfg.block_m) * -(-args.n // cfg.block_n),)
    _gemm_kernel[grid](
        x, args.packed, args.scales,
        args.zeros if args.zeros is not None else args.scales,
        args.perm if args.perm is not None else args.packed,
        bias if bias is not None else out, out,
        m, args.n, args.k, args.group_size, x.stride(0),
        **constexprs(cfg, args.bits, args.zero_mode, args.perm is not None,
                     group_per_step(args, cfg.block_k), bias is not None),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
