"""Triton family "splitk": y = x @ dequant(W)^T with tensor cores and split-K (small to mid M).

What it computes: [M, N] output tiles of BLOCK_M x BLOCK_N (M padded to 16+ by masking)
with mma, each over a contiguous range of K steps; SPLIT ranges run as separate programs
so that even N = 4096 (32 tiles of 128 columns) fills all SMs. With SPLIT = 1 and large
tiles it is a plain tiled GEMM.

Layout: the Triton layout of triton_common.py (int32 words [KW, N] packed along K).
A step loads [BLOCK_KW, BLOCK_N] words exactly once (16-byte loads along N; the next step's
words are loaded before this step's math, a register double buffer, so HBM latency hides
behind the dequantization) and expands them to the E = 32 // bits codes of each word:
  single-dot mode (default): codes as a [BLOCK_KW, E, BLOCK_N] tensor, reshaped to
      [BLOCK_K, BLOCK_N] in k order (k = E*r + j), one dot with the contiguous x tile
      [BLOCK_M, BLOCK_K] (which Triton pipelines with async copies);
  planes mode (PLANES=True): E dots of x[:, E*r + j] ([BLOCK_M, BLOCK_KW], a strided
      gather) times plane j ([BLOCK_KW, BLOCK_N]); no reshape. Kept for comparison.
BLOCK_KW >= 16 in planes mode (mma K).

Scales: when a whole step lies in one group (GROUP_PER_STEP: group size a multiple of the
step's codes, or per-channel) the dot operand is (q - z) (small integers, exact in fp16 and
bf16; rounded once for fractional z), accumulated in fp32, and the scale multiplies the
[BLOCK_M, BLOCK_N] step result: BLOCK_M*BLOCK_N multiplies per step instead of
BLOCK_K*BLOCK_N. Offsets use s*(x.q) + o*sum(x). Otherwise (group 32/64 under a longer
step) each word row's scale is applied to the codes before the dot.

Split-K reduction: each split writes fp32 [M, N] partials to a cached workspace
[SPLIT, M, N]; _reduce_kernel sums them in split order (deterministic, no atomics), adds
the bias and casts. SPLIT == 1 writes the output directly.

Test: tests/test_triton.py. Benchmark: bench/triton_tune.py.
"""

from __future__ import annotations

from .triton_common import group_per_step, split_count, tl, triton, workspace

if triton is not None:

    @triton.jit
    def _splitk_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr,
                       M, N, K, KW, GS, stride_xm, steps_per_split,
                       BITS: tl.constexpr, ZERO_MODE: tl.constexpr, ACT_ORDER: tl.constexpr,
                       GROUP_PER_STEP: tl.constexpr, HAS_BIAS: tl.constexpr,
                       USE_WS: tl.constexpr, PLANES: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        E: tl.constexpr = 32 // BITS
        BLOCK_K: tl.constexpr = BLOCK_KW * E
        MASK: tl.constexpr = (1 << BITS) - 1
        MAGIC: tl.constexpr = 0x4B000000  # bits of 2.0**23
        SYM_BIAS: tl.constexpr = 8388608.0 + (1 << (BITS - 1))
        DT = x_ptr.dtype.element_ty
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = tl.arange(0, BLOCK_KW)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        shifts3 = (tl.arange(0, E) * BITS)[None, :, None]
        offs_bk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        step0 = pid_k * steps_per_split
        # the last split may own fewer steps; never step past K (a step's group index must
        # stay < G: the per-step scale load is masked only along N)
        step_end = tl.minimum(step0 + steps_per_split, tl.cdiv(KW, BLOCK_KW))
        row_end = tl.minimum(KW, step_end * BLOCK_KW)
        r = step0 * BLOCK_KW + rows
        w_cols = w_ptr + offs_n[None, :]
        words = tl.load(w_cols + r[:, None] * N, mask=(r < row_end)[:, None] & mask_n[None, :],
                        other=0)
        for step in range(step0, step_end):
            # register double buffer: issue the next step's loads before this step's math
            r_next = r + BLOCK_KW
            words_next = tl.load(w_cols + r_next[:, None] * N,
                                 mask=(r_next < row_end)[:, None] & mask_n[None, :], other=0)
            mask_rn = (r < KW)[:, None] & mask_n[None, :]
            if GROUP_PER_STEP:
                g = (step * BLOCK_K) // GS
                s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                if ZERO_MODE != 0:
                    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
            else:
                gofs = ((r * E) // GS)[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + gofs, mask=mask_rn, other=0.0).to(tl.float32)
                if ZERO_MODE != 0:
                    z = tl.load(z_ptr + gofs, mask=mask_rn, other=0.0)
            if PLANES:
                accq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                xs = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for j in tl.static_range(E):
                    k = r * E + j
                    mask_k = k < K
                    if ACT_ORDER:
                        src = tl.load(perm_ptr + k, mask=mask_k, other=0)
                    else:
                        src = k
                    xj = tl.load(x_rows + src[None, :], mask=mask_m[:, None] & mask_k[None, :],
                                 other=0.0)
                    qf = (((words >> (j * BITS)) & MASK) | MAGIC).to(tl.float32, bitcast=True)
                    if GROUP_PER_STEP:
                        if ZERO_MODE == 0:
                            wq = qf - SYM_BIAS
                        elif ZERO_MODE == 1:
                            wq = (qf - 8388608.0) - z
                        else:
                            wq = qf - 8388608.0
                            xs += tl.sum(xj.to(tl.float32), axis=1)
                        accq = tl.dot(xj, wq.to(DT), accq)
                    else:
                        if ZERO_MODE == 0:
                            w = (qf - SYM_BIAS) * s
                        elif ZERO_MODE == 1:
                            w = ((qf - 8388608.0) - z) * s
                        else:
                            w = (qf - 8388608.0) * s + z
                        acc = tl.dot(xj, w.to(DT), acc)
                if GROUP_PER_STEP:
                    if ZERO_MODE == 2:
                        acc += accq * s[None, :] + xs[:, None] * z
                    else:
                        acc += accq * s[None, :]
            else:
                k = step * BLOCK_K + offs_bk
                mask_k = k < K
                if ACT_ORDER:
                    src = tl.load(perm_ptr + k, mask=mask_k, other=0)
                else:
                    src = k
                a = tl.load(x_rows + src[None, :], mask=mask_m[:, None] & mask_k[None, :],
                            other=0.0)
                qf3 = (((words[:, None, :] >> shifts3) & MASK) | MAGIC).to(tl.float32,
                                                                           bitcast=True)
                if GROUP_PER_STEP:
                    if ZERO_MODE == 0:
                        w3 = qf3 - SYM_BIAS
                    elif ZERO_MODE == 1:
                        w3 = (qf3 - 8388608.0) - z[:, None, :]
                    else:
                        w3 = qf3 - 8388608.0
                    w = tl.reshape(w3.to(DT), (BLOCK_K, BLOCK_N))
                    accq = tl.dot(a, w)
                    if ZERO_MODE == 2:
                        xs = tl.sum(a.to(tl.float32), axis=1)
                        acc += accq * s[None, :] + xs[:, None] * z
                    else:
                        acc += accq * s[None, :]
                else:
                    if ZERO_MODE == 0:
                        w3 = (qf3 - SYM_BIAS) * s[:, None, :]
                    elif ZERO_MODE == 1:
                        w3 = ((qf3 - 8388608.0) - z[:, None, :]) * s[:, None, :]
                    else:
                        w3 = (qf3 - 8388608.0) * s[:, None, :] + z[:, None, :]
                    w = tl.reshape(w3.to(DT), (BLOCK_K, BLOCK_N))
                    acc = tl.dot(a, w, acc)
            words = words_next
            r = r_next
        offs_out = offs_m[:, None] * N + offs_n[None, :]
        mask_out = mask_m[:, None] & mask_n[None, :]
        if USE_WS:
            tl.store(ws_ptr + pid_k * M * N + offs_out, acc, mask=mask_out)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_out, acc.to(out_ptr.dtype.element_ty), mask=mask_out)

    @triton.jit
    def _reduce_kernel(ws_ptr, bias_ptr, out_ptr, MN, N, SPLIT,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLIT):
            acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(ws, bias, out, splits):
    """out[M, N] = sum over splits of ws[s, M, N] (+ bias), in split order."""
    mn = out.numel()
    block = 1024
    _reduce_kernel[(-(-mn // block),)](ws, bias if bias is not None else out, out, mn,
                                       out.shape[1], splits, HAS_BIAS=bias is not None,
                                       BLOCK=block, num_warps=4)
    return out


def constexprs(cfg, bits, zero_mode, act_order, group_per_step, has_bias, use_ws):
    """The kernel's compile-time arguments (also used by bench/triton_aot_check.py)."""
    return dict(BITS=bits, ZERO_MODE=zero_mode, ACT_ORDER=act_order,
                GROUP_PER_STEP=group_per_step, HAS_BIAS=has_bias, USE_WS=use_ws,
                PLANES=cfg.planes, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_KW=cfg.block_k // (32 // bits))


def launch(x, args, bias, cfg, out):
    """x [M, K] contiguous; out [M, N] contiguous in x.dtype (written, also returned)."""
    m = x.shape[0]
    e = 32 // args.bits
    block_kw = cfg.block_k // e
    if cfg.block_k % e or (cfg.planes and block_kw < 16) or block_kw < 1:
        raise ValueError(f"cfg.block_k: expected a multiple of {e} (>= {16 * e} in planes "
                         f"mode) for {args.bits}-bit splitk, got {cfg.block_k}")
    kw = args.packed.shape[0]
    k_steps = -(-kw // block_kw)
    tiles = -(-m // cfg.block_m) * -(-args.n // cfg.block_n)
    splits, per_split = split_count(cfg, tiles, k_steps, x.device)
    ws = workspace(x.device, splits * m * args.n) if splits > 1 else out
    _splitk_kernel[(tiles, splits)](
        x, args.packed, args.scales,
        args.zeros if args.zeros is not None else args.scales,
        args.perm if args.perm is not None else args.packed,
        bias if bias is not None else out, out, ws,
        m, args.n, args.k, kw, args.group_size, x.stride(0), per_split,
        **constexprs(cfg, args.bits, args.zero_mode, args.perm is not None,
                     group_per_step(args, block_kw * e), bias is not None, splits > 1),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        reduce_splits(ws, bias, out, splits)
    return out
