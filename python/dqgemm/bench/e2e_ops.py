"""The non-matmul parts of the end-to-end decode benchmark (dqgemm.bench.e2e), fused.

One decode step of a Llama layer at batch 1-32 is 4 weight-streaming matmuls and a long
tail of tiny kernels (norms, residual adds, RoPE, KV-cache writes, attention, SiLU). In
plain torch those are ~35 launches per layer, and inside a CUDA graph each still costs
~2 us: on an H200 that tail was ~3 ms of the 6.9 ms FP16 step of Llama-3-8B, more than the
INT4 matmuls themselves. Serving stacks fuse them; so does this benchmark, identically for
the FP16 and the quantized variants (measured, before attention was fused: FP16 7.07 ->
5.14 ms per step, INT4 1.36x -> 1.57x FP16 at batch 1; bench/results/NOTES.md, "End-to-end
decode: the elementwise tail"). A later profile of the graph (H200, Llama-3-8B, batch 1,
context 256; bench/results/h200_2026-12-02_s9_e2e_profile_8b.json) put torch's masked SDPA
at ~24 us per layer: 2 fills, a where, a memset and an 11 us cuDNN flash kernel, with ~7 us
of gaps between them; hence decode_attention:

- ``add_rmsnorm(x, residual, weight, eps)``: h = x + residual (the residual stream, in the
  activation dtype as torch adds it), y = rmsnorm(h) * weight; one launch per call.
- ``rope_to_cache(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv_heads)``: splits the
  fused QKV projection, rotates q and k (half-split RoPE), writes k and v into the static
  caches at ``pos`` (a device tensor, so a captured graph advances it) and returns q as
  [B, n_heads, head_dim]; one launch.
- ``decode_attention(q, k_cache, v_cache, pos, mask=None)``: grouped-query attention of
  rope_to_cache's q over cache positions 0..pos (pos read on the device), scale
  1/sqrt(head_dim); returns [B, n_heads, head_dim]. Triton: flash decoding, the cache split
  into a shape-fixed number of parts (``attention_splits``) so that batch 1 fills the GPU,
  one program per part, sequence and kv head holding the group's query heads, online
  softmax in fp32, then a combine launch that merges the parts' partials in a fixed order
  (none when one part covers the cache); no host synchronization, deterministic. torch: the
  benchmark's original scaled_dot_product_attention over the whole cache with a boolean
  mask (``mask``, built from pos when not given).
- ``silu_mul(gate_up)``: silu(gate) * up of a fused gate+up projection; one launch.

Each op takes an ``impl`` argument ("torch" by default) and has a Triton kernel (CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1 for the tests) and a torch implementation
with the benchmark's original arithmetic (CPU runs, and the oracle of
tests/test_e2e_ops.py). The Triton kernels compute in fp32 and round once, so they differ
from the torch ops (which round after every fp16 operation) by ~1 ulp; the attention
kernel, like flash attention, rounds the softmax weights to the cache dtype for the
tensor-core product with V (tests/test_e2e_ops.py checks both impls against float64).

Within dqgemm.programmatic_launch() (on compute capability 9.0+) the Triton kernels are
programmatic dependent launches that let the next kernel launch at once and wait for the
previous one before reading anything (griddepcontrol), like dqgemm's decode kernel: a
decode step's chain of short kernels then overlaps each launch with the kernel before it.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import launch, ops

try:  # optional, like the Triton backend
    import triton
    import triton.language as tl
    import triton.language.extra.cuda  # noqa: F401  (tl.extra.cuda.gdc_*: PDL)
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
    def _programmatic_start(PDL: tl.constexpr):
        # In a programmatic launch (dqgemm.launch): let the next kernel in the stream start
        # launching, then wait for the previous one's outputs before reading anything.
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, h_ptr, y_ptr, hidden, eps,
                            HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
        _programmatic_start(PDL)
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
                              HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                              PDL: tl.constexpr):
        _programmatic_start(PDL)
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
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
        _programmatic_start(PDL)
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(gu_ptr + row * 2 * inter + offs, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * 2 * inter + inter + offs, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        out = gf / (1.0 + tl.exp(-gf)) * u.to(tl.float32)
        tl.store(out_ptr + row * inter + offs, out.to(g.dtype), mask=mask)

    @triton.jit
    def _decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, acc_ptr, ml_ptr,
                                       q_stride_b, q_stride_h, n_kv, group, cache_len,
                                       split_len, n_splits, qk_scale,
                                       HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr,
                                       BLOCK_S: tl.constexpr, DIRECT: tl.constexpr,
                                       PDL: tl.constexpr):
        _programmatic_start(PDL)
        # one program per (KV split, sequence x kv head): the group's query heads are the
        # rows of one tile, so each K/V row is read once for all of them
        split = tl.program_id(0)
        bk = tl.program_id(1)                       # b * n_kv + kv head
        b = bk // n_kv
        head0 = (bk % n_kv) * group                 # first query head of the group
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < group
        q = tl.load(q_ptr + b * q_stride_b + (head0 + rows[:, None]) * q_stride_h
                    + dims[None, :], mask=row_ok[:, None], other=0.0)
        # positions of this split that are attended: [lo, hi), empty past pos
        pos = tl.load(pos_ptr).to(tl.int32)
        lo = split * split_len
        hi = tl.minimum(tl.minimum(lo + split_len, pos + 1), cache_len)
        kv_base = bk.to(tl.int64) * cache_len * HEAD_DIM
        # online softmax in base 2 (qk_scale includes log2(e)); fp32 statistics
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(lo, hi, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            ok = offs < hi                          # every block holds >= 1 valid position
            kv_offs = kv_base + offs[:, None] * HEAD_DIM + dims[None, :]
            k = tl.load(k_ptr + kv_offs, mask=ok[:, None], other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale   # [GROUP_PAD, BLOCK_S], fp32
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)            # 0 on the first block (m_i = -inf)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # P rounded to the cache dtype for the tensor-core product, as flash attention
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if DIRECT:  # a single split: it holds the whole softmax, no combine pass
            o_offs = (b * n_kv * group + head0 + rows[:, None]) * HEAD_DIM + dims[None, :]
            tl.store(out_ptr + o_offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
        else:  # the unnormalized partial; an empty split stores m = -inf, l = 0, acc = 0
            part = (bk * n_splits + split) * group + rows
            tl.store(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc,
                     mask=row_ok[:, None])
            tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
            tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)

    @triton.jit
    def _decode_attention_combine_kernel(acc_ptr, ml_ptr, out_ptr, n_heads, group, n_splits,
                                         HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
                                         PDL: tl.constexpr):
        _programmatic_start(PDL)
        # one program per (sequence, query head): rescale the partials of every split to
        # their common max and sum them in a fixed order (deterministic)
        row = tl.program_id(0)                      # b * n_heads + h
        b = row // n_heads
        h = row % n_heads
        splits = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, HEAD_DIM)
        ok = splits < n_splits
        # partial index ((b * n_kv + h // group) * n_splits + split) * group + h % group
        part = ((b * (n_heads // group) + h // group) * n_splits + splits) * group + h % group
        m = tl.load(ml_ptr + part * 2, mask=ok, other=float("-inf"))
        l = tl.load(ml_ptr + part * 2 + 1, mask=ok, other=0.0)
        acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None],
                      other=0.0)
        # split 0 always holds position 0, so the max is finite and empty splits weigh 0
        w = tl.exp2(m - tl.max(m, axis=0))
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------
# Public ops.
# ----------------------------------------------------------------------------------------

def _pdl(device: torch.device) -> Dict[str, bool]:
    """Launch options of the Triton kernels: a programmatic dependent launch within
    dqgemm.programmatic_launch() on compute capability 9.0+ (never in the interpreter),
    so that these short kernels and the matmuls between them overlap their launches
    (dqgemm.launch)."""
    on = (launch.programmatic_launch_enabled() and device.type == "cuda"
          and os.environ.get("TRITON_INTERPRET") != "1"
          and ops._device_facts(device)[1] >= (9, 0))
    return {"PDL": on, "launch_pdl": on}


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
        num_warps=8 if block >= 2048 else 4, **_pdl(x.device))
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
        HEAD_DIM=d, HALF=d // 2, num_warps=1, **_pdl(qkv.device))
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
        rows, out, inter, BLOCK=block, num_warps=4, **_pdl(gate_up.device))
    return out


# Programs the attention kernel aims for: ~2 per SM of a 132-SM H100/H200, so that enough
# K/V loads are in flight to hide the memory latency at batch 1 (8 kv heads alone fill 8 SMs).
_ATTENTION_PROGRAMS = 256
# The combine kernel holds one [splits, head_dim] fp32 tile per program: 64 x 128 is 64
# registers a thread at 4 warps; more splits would spill (only MQA at batch 1 asks for more).
_ATTENTION_MAX_SPLITS = 64
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def attention_splits(batch: int, n_kv_heads: int, cache_len: int) -> Tuple[int, int, int]:
    """(n_splits, split_len, block_s) of the Triton decode attention for a cache of shape
    [batch, n_kv_heads, cache_len, d].

    A function of the shape only, never of the position: a captured graph replays the same
    launches at every step, and the splits past the position store empty partials.
    split_len is a multiple of block_s (the positions one loop iteration reads); as many
    splits as give ~_ATTENTION_PROGRAMS programs, at most one per 32 positions and at most
    _ATTENTION_MAX_SPLITS.
    """
    want = max(1, min(_cdiv(cache_len, 32), _cdiv(_ATTENTION_PROGRAMS, batch * n_kv_heads),
                      _ATTENTION_MAX_SPLITS))
    split_len = _cdiv(cache_len, want)
    block = 32 if split_len <= 64 else 64      # longer splits: fewer, larger loads
    split_len = _cdiv(split_len, block) * block
    return _cdiv(cache_len, split_len), split_len, block


def _attention_buffers(q: torch.Tensor, n_kv_heads: int, n_splits: int
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                  Optional[torch.Tensor]]:
    """The output [B, n_heads, d] and, with several splits, the fp32 workspace of their
    partials: acc [B * n_kv, n_splits, group, d] and (max, sum) [B * n_kv, n_splits, group,
    2]; None, None with one split (the split kernel then writes the output itself).

    Sizes depend on the shape only (fine under CUDA graph capture); the tests wrap this
    function to poison every buffer with NaN."""
    b, n_heads, d = q.shape
    group = n_heads // n_kv_heads
    out = torch.empty(b, n_heads, d, device=q.device, dtype=q.dtype)
    if n_splits == 1:
        return out, None, None
    acc = torch.empty(b * n_kv_heads, n_splits, group, d, device=q.device,
                      dtype=torch.float32)
    ml = torch.empty(b * n_kv_heads, n_splits, group, 2, device=q.device, dtype=torch.float32)
    return out, acc, ml


def _check_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          pos: torch.Tensor, impl: str) -> None:
    if q.dim() != 3:
        raise ValueError(f"q: expected [B, n_heads, head_dim], got shape {tuple(q.shape)}")
    b, n_heads, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache: expected two [B, n_kv_heads, S, head_dim] tensors "
                         f"of one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[2] == 0:
        raise ValueError(f"k_cache/v_cache: expected at least one position, got shape "
                         f"{tuple(k_cache.shape)}")
    if k_cache.shape[-1] != d:
        raise ValueError(f"head_dim: q has {d}, k_cache/v_cache have {k_cache.shape[-1]}")
    if k_cache.shape[0] != b:
        raise ValueError(f"k_cache/v_cache: expected batch {b} (q's), got {k_cache.shape[0]}")
    n_kv = k_cache.shape[1]
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"q: expected n_heads a multiple of n_kv_heads = {n_kv}, got "
                         f"{n_heads}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (q's), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (q's), got {t.device}")
    if pos.shape != (1,) or pos.dtype != torch.int64 or pos.device != q.device:
        raise ValueError(f"pos: expected an int64 tensor of shape [1] on {q.device}, got "
                         f"{pos.dtype} of shape {tuple(pos.shape)} on {pos.device}")
    if impl != "triton":
        return
    if q.dtype not in _ATTENTION_DTYPES:
        raise ValueError(f"q: expected dtype float16 or bfloat16 (the Triton kernel's), "
                         f"got {q.dtype}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim: the Triton kernel needs a power of two >= 16, got {d}")
    if q.stride(-1) != 1:
        raise ValueError(f"q: expected a unit stride on head_dim, got strides {q.stride()}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides "
                             f"{t.stride()}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: torch.Tensor, impl: str = "torch",
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of one new token per sequence over a static KV cache: [B, n_heads, d].

    q: [B, n_heads, d] (rope_to_cache's output); k_cache, v_cache: [B, n_kv_heads, S, d];
    pos: int64 [1] on the device, the position just written: positions 0..pos are attended
    (pos in [0, S - 1]). Grouped-query: query head h reads kv head h // (n_heads //
    n_kv_heads); scale 1 / sqrt(d).

    "torch": the benchmark's original SDPA call with a boolean mask over the whole cache
    (``mask``, [1, 1, 1, S] with True at 0..pos, is built from pos when not given).
    "triton": flash decoding, two launches and no host synchronization: the split kernel
    (one program per KV split x sequence x kv head, the group's query heads as the rows of
    one tl.dot tile, online softmax in fp32) writes unnormalized partials; the combine
    kernel merges them per query head (skipped when one split covers the cache).
    """
    _check_attention_args(q, k_cache, v_cache, pos, impl)
    b, n_heads, d = q.shape
    n_kv, cache_len = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    if impl == "torch":
        if mask is None:
            mask = (torch.arange(cache_len, device=q.device) <= pos).view(1, 1, 1, -1)
        # GQA for one new token: the group's query heads act as the query rows of its kv head
        qg = q.reshape(b, n_kv, group, d)
        att = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=mask)
        return att.reshape(b, n_heads, d)
    check_impl(impl, q.device)
    n_splits, split_len, block_s = attention_splits(b, n_kv, cache_len)
    out, acc, ml = _attention_buffers(q, n_kv, n_splits)
    direct = acc is None        # one split: the split kernel normalizes and writes out
    _decode_attention_split_kernel[(n_splits, b * n_kv)](
        q, k_cache, v_cache, pos, out, out if direct else acc, out if direct else ml,
        q.stride(0), q.stride(1), n_kv, group, cache_len, split_len, n_splits,
        math.log2(math.e) / math.sqrt(d),
        HEAD_DIM=d, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_S=block_s,
        DIRECT=direct, num_warps=4, **_pdl(q.device))
    if not direct:
        _decode_attention_combine_kernel[(b * n_heads,)](
            acc, ml, out, n_heads, group, n_splits, HEAD_DIM=d,
            SPLITS_PAD=triton.next_power_of_2(n_splits), num_warps=4, **_pdl(q.device))
    return out
