"""Triton family "gemv": y[1, N] = x[1, K] @ dequant(W)^T for M = 1 (decode of one token).

What it computes: one output row, without tensor cores (at M = 1 an mma would waste 15 of
its 16 rows). Layout: the Triton layout of triton_common.py (int32 words [KW, N] packed along
K, scales [G, N], fp32 zero points / offsets [G, N], optional act-order permutation).

Tiles: a program owns BLOCK_N output columns and a contiguous range of K steps (split-K);
one step loads a [BLOCK_KW, BLOCK_N] tile of words (16-byte loads, contiguous along N; the
next step's tile is loaded before this step's math, a register double buffer) and,
for each of the E = 32 // bits codes of a word, accumulates x[k] * (q - z) into a
[BLOCK_KW, BLOCK_N] fp32 register tile; the scale is applied once per word row (8 INT4
codes), the cross-row sum happens once at the end. Per code that is a shift, an and-or
(q | 2**23 magic), an fp32 subtract and an FMA: no int->float conversions.
SHIFTLESS (config "shiftless", not yet measured on a GPU, a tuning candidate): codes whose
field ends below bit 23 are read in place as q * 2**sh (one and-or, no shift) and x is
scaled by 2**-sh per row instead; the high codes share one shift.
ROW_REDUCE / PREFETCH (configs "row_reduce", "prefetch"; tuning candidates): fold the rows
into a [BLOCK_N] accumulator every step, and drop the register double buffer; both cut
registers (the INT4 64 x 512-code config spills at 255 registers with neither).
Zero points / offsets: sum_k x*(q - z)*s = s*(sum x*q - z*sum x); offsets likewise
(s*sum x*q + o*sum x), so fractional zero points cost nothing per code.

Split-K: with SPLIT > 1 each split writes fp32 partial sums to a workspace [SPLIT, N], and
triton_splitk.reduce_splits adds them in a fixed order (deterministic) with the bias.

Constraints: M == 1; group sizes >= 8 codes (all kpack-v1 group sizes are).
Test: tests/test_triton.py. Benchmark: bench/triton_tune.py.
"""

from __future__ import annotations

from .triton_common import group_per_step, split_count, tl, triton, workspace

if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr,
                     N, K, KW, GS, steps_per_split,
                     BITS: tl.constexpr, ZERO_MODE: tl.constexpr, ACT_ORDER: tl.constexpr,
                     GROUP_PER_STEP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     USE_WS: tl.constexpr, SHIFTLESS: tl.constexpr, ROW_REDUCE: tl.constexpr,
                     PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        E: tl.constexpr = 32 // BITS
        HI_SHIFT: tl.constexpr = 12 + (BITS // 8) * 4   # 12 for INT4, 16 for INT8
        MASK: tl.constexpr = (1 << BITS) - 1
        MAGIC: tl.constexpr = 0x4B000000  # bits of 2.0**23 (triton_common.MAGIC_F32)
        SYM_BIAS: tl.constexpr = 8388608.0 + (1 << (BITS - 1))
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = tl.arange(0, BLOCK_KW)
        if ROW_REDUCE:
            acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
        step0 = pid_k * steps_per_split
        # the last split may own fewer steps; never step past K (a step's group index must
        # stay < G: the per-step scale load is masked only along N)
        step_end = tl.minimum(step0 + steps_per_split, tl.cdiv(KW, BLOCK_KW))
        row_end = tl.minimum(KW, step_end * BLOCK_KW)
        r = step0 * BLOCK_KW + rows
        w_cols = w_ptr + offs_n[None, :]
        if PREFETCH:
            words = tl.load(w_cols + r[:, None] * N,
                            mask=(r < row_end)[:, None] & mask_n[None, :], other=0)
        for step in range(step0, step_end):
            r_next = r + BLOCK_KW
            if PREFETCH:
                # register double buffer: issue the next step's loads before this step's math
                words_next = tl.load(w_cols + r_next[:, None] * N,
                                     mask=(r_next < row_end)[:, None] & mask_n[None, :],
                                     other=0)
            else:
                words = tl.load(w_cols + r[:, None] * N,
                                mask=(r < row_end)[:, None] & mask_n[None, :], other=0)
            mask_rn = (r < KW)[:, None] & mask_n[None, :]
            if GROUP_PER_STEP:
                g = (step * BLOCK_KW * E) // GS
                s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                s = s[None, :]
                if ZERO_MODE != 0:
                    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
            else:
                g = (r * E) // GS
                gofs = g[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + gofs, mask=mask_rn, other=0.0).to(tl.float32)
                if ZERO_MODE != 0:
                    z = tl.load(z_ptr + gofs, mask=mask_rn, other=0.0)
            accq = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((BLOCK_KW,), dtype=tl.float32)
            if SHIFTLESS:
                words_hi = words >> HI_SHIFT
            for j in tl.static_range(E):
                k = r * E + j
                mask_k = k < K
                if ACT_ORDER:
                    src = tl.load(perm_ptr + k, mask=mask_k, other=0)
                else:
                    src = k
                xj = tl.load(x_ptr + src, mask=mask_k, other=0.0).to(tl.float32)
                if ZERO_MODE != 0:
                    xs += xj
                if SHIFTLESS:
                    # Code j stays in place: (w & (MASK << sh)) | 2**23 reads q * 2**sh exactly
                    # while sh + BITS <= 23; x is scaled by 2**-sh instead (per row, exact).
                    # Saves the shift per code (one shared shift for the high codes).
                    if j * BITS + BITS <= 23:
                        wsrc = words
                        sh = j * BITS
                    else:
                        wsrc = words_hi
                        sh = j * BITS - HI_SHIFT
                    qf = ((wsrc & (MASK << sh)) | MAGIC).to(tl.float32, bitcast=True)
                    if ZERO_MODE == 0:
                        qf = qf - (8388608.0 + (1 << (BITS - 1)) * (1 << sh))
                    else:
                        qf = qf - 8388608.0
                    xj = xj * (1.0 / (1 << sh))
                else:
                    qf = (((words >> (j * BITS)) & MASK) | MAGIC).to(tl.float32, bitcast=True)
                    if ZERO_MODE == 0:
                        qf = qf - SYM_BIAS
                    else:
                        qf = qf - 8388608.0
                accq += xj[:, None] * qf
            if ZERO_MODE == 0:
                part = accq * s
            elif ZERO_MODE == 1:
                part = (accq - xs[:, None] * z) * s
            else:
                part = accq * s + xs[:, None] * z
            if ROW_REDUCE:
                # fold the rows every step: one [BLOCK_KW, BLOCK_N] fp32 tile fewer in
                # registers, for a cross-thread reduction per step
                acc1 += tl.sum(part, axis=0)
            else:
                acc += part
            if PREFETCH:
                words = words_next
            r = r_next
        if ROW_REDUCE:
            res = acc1
        else:
            res = tl.sum(acc, axis=0)
        if USE_WS:
            tl.store(ws_ptr + pid_k * N + offs_n, res, mask=mask_n)
        else:
            if HAS_BIAS:
                res += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, res.to(out_ptr.dtype.element_ty), mask=mask_n)


def constexprs(cfg, bits, zero_mode, act_order, group_per_step, has_bias, use_ws):
    """The kernel's compile-time arguments for a config and a weight variant (also used by
    bench/triton_aot_check.py to compile without a GPU)."""
    return dict(BITS=bits, ZERO_MODE=zero_mode, ACT_ORDER=act_order,
                GROUP_PER_STEP=group_per_step, HAS_BIAS=has_bias, USE_WS=use_ws,
                SHIFTLESS=cfg.shiftless, ROW_REDUCE=cfg.row_reduce,
                PREFETCH=cfg.prefetch, BLOCK_N=cfg.block_n,
                BLOCK_KW=cfg.block_k // (32 // bits))


def launch(x, args, bias, cfg, out):
    """x [1, K] contiguous; out [1, N] contiguous in x.dtype (written, also returned)."""
    from .triton_splitk import reduce_splits
    e = 32 // args.bits
    block_kw = cfg.block_k // e
    kw = args.packed.shape[0]
    k_steps = -(-kw // block_kw)
    splits, per_split = split_count(cfg, -(-args.n // cfg.block_n), k_steps, x.device)
    ws = workspace(x.device, splits * args.n) if splits > 1 else out
    grid = (-(-args.n // cfg.block_n), splits)
    _gemv_kernel[grid](
        x, args.packed, args.scales,
        args.zeros if args.zeros is not None else args.scales,
        args.perm if args.perm is not None else args.packed,
        bias if bias is not None else out, out, ws,
        args.n, args.k, kw, args.group_size, per_split,
        **constexprs(cfg, args.bits, args.zero_mode, args.perm is not None,
                     group_per_step(args, block_kw * e), bias is not None, splits > 1),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        reduce_splits(ws, bias, out, splits)
    return out
