"""The fused ops of the end-to-end benchmark (dqgemm.bench.e2e_ops): the Triton kernels
against the torch implementation (the benchmark's original arithmetic), and decode
attention, both implementations, against a float64 softmax written out here.

Without a GPU the Triton kernels run in the interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1); with one, on CUDA tensors. Outputs are poisoned with NaN before
each kernel; odd sizes (a hidden size that is not a power of two, 3 sequences, a
position inside the cache, a cache length that is not a multiple of the attention block)
are included.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from dqgemm.bench import e2e_ops
from _util import TOLERANCE, rel_error

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    e2e_ops.TRITON_ERROR is not None or not (HAS_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
    reason=e2e_ops.TRITON_ERROR or "needs a GPU or TRITON_INTERPRET=1")


def _randn(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).half().to(DEVICE)


@needs_triton
@pytest.mark.parametrize("hidden", [256, 200])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm_matches_torch(hidden, with_residual):
    x = _randn(3, 1, hidden, seed=hidden)
    res = _randn(3, 1, hidden, seed=hidden + 1) if with_residual else None
    w = (1 + 0.1 * _randn(hidden, seed=7).float()).half()
    h_t, y_t = e2e_ops.add_rmsnorm(x, res, w, 1e-5, "torch")
    h, y = e2e_ops.add_rmsnorm(x, res, w, 1e-5, "triton")
    assert torch.equal(h, h_t)          # one fp16 add either way
    assert torch.isfinite(y).all()
    assert rel_error(y, y_t) < 2e-3


@needs_triton
def test_rope_to_cache_matches_torch():
    b, nh, nkv, d, s, pos = 3, 4, 2, 64, 40, 17
    qkv = _randn(b, 1, (nh + 2 * nkv) * d, seed=1)
    ang = torch.rand(1, d // 2, generator=torch.Generator().manual_seed(2)) * 6.0
    cos, sin = ang.cos().half().to(DEVICE), ang.sin().half().to(DEVICE)
    p = torch.tensor([pos], device=DEVICE)
    caches = {}
    for impl in ("torch", "triton"):
        kc = _randn(b, nkv, s, d, seed=3)
        vc = _randn(b, nkv, s, d, seed=4)
        q = e2e_ops.rope_to_cache(qkv, cos, sin, p, kc, vc, nh, nkv, impl)
        caches[impl] = (q, kc, vc)
    (q_t, k_t, v_t), (q, k, v) = caches["torch"], caches["triton"]
    assert q.shape == (b, nh, d) and torch.isfinite(q).all()
    assert rel_error(q, q_t) < 2e-3
    assert rel_error(k[:, :, pos], k_t[:, :, pos]) < 2e-3
    assert torch.equal(v[:, :, pos], v_t[:, :, pos])
    # every other position is untouched
    others = [i for i in range(s) if i != pos]
    assert torch.equal(k[:, :, others], k_t[:, :, others])
    assert torch.equal(v[:, :, others], v_t[:, :, others])


@needs_triton
@pytest.mark.parametrize("inter", [512, 1500])
def test_silu_mul_matches_torch(inter):
    gu = _randn(3, 1, 2 * inter, seed=inter)
    ref = e2e_ops.silu_mul(gu, "torch")
    out = e2e_ops.silu_mul(gu, "triton")
    assert out.shape == (3, 1, inter) and torch.isfinite(out).all()
    assert rel_error(out, ref) < 2e-3


@needs_triton
def test_tiny_model_step_is_the_same_with_either_implementation():
    """One decode step of the benchmark's tiny Llama: logits of the fused ops against the
    torch ops (same weights, same cache)."""
    from dqgemm.bench import e2e
    cfg = e2e.MODELS["tiny"]
    logits = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        net = e2e.DecoderModel(cfg, 1, None, 128, "auto", DEVICE, torch.float16,
                               elementwise=impl).eval()
        state = e2e._new_state(net, 2, 64, 10, torch.device(DEVICE), torch.float16)
        state.logits.fill_(float("nan"))
        with torch.no_grad():
            net.step(state)
        logits[impl] = state.logits.clone()
    assert torch.isfinite(logits["triton"]).all()
    assert rel_error(logits["triton"], logits["torch"]) < 5e-3


def _attention_reference(q, k_cache, v_cache, pos: int) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d)) v over positions 0..pos, one query head at a time
    (head h reads kv head h // (n_heads / n_kv_heads)); [B, n_heads, d] on the CPU."""
    b, n_heads, d = q.shape
    group = n_heads // k_cache.shape[1]
    out = torch.empty(b, n_heads, d, dtype=torch.float64)
    for h in range(n_heads):
        qh = q[:, h].double().cpu()                                  # [B, d]
        k = k_cache[:, h // group, :pos + 1].double().cpu()          # [B, pos + 1, d]
        v = v_cache[:, h // group, :pos + 1].double().cpu()
        scores = torch.einsum("bd,bsd->bs", qh, k) / math.sqrt(d)
        w = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        out[:, h] = torch.einsum("bs,bsd->bd", w / w.sum(dim=-1, keepdim=True), v)
    return out


@pytest.fixture
def poisoned_attention(monkeypatch):
    """NaN in the attention output and workspace before every Triton launch."""
    real = e2e_ops._attention_buffers

    def poisoned(*args):
        bufs = real(*args)
        for t in bufs:
            if t is not None:
                t.fill_(float("nan"))
        return bufs
    monkeypatch.setattr(e2e_ops, "_attention_buffers", poisoned)


# (batch, n_heads, n_kv_heads, head_dim, cache_len, programs aimed at, splits that gives):
# several splits with empty ones past pos, one split (no combine pass), splits of two
# loop blocks with a ragged last block; groups of 1, 4 and 8.
ATTENTION_CASES = [
    (1, 4, 4, 64, 100, None, 4),
    (3, 8, 2, 128, 100, None, 4),
    (3, 8, 2, 64, 150, 12, 2),
    (1, 8, 2, 128, 90, 1, 1),
    (3, 4, 1, 64, 20, None, 1),
    (1, 8, 1, 64, 70, None, 3),
]
BF16_INTERPRETER = pytest.mark.skipif(
    not HAS_GPU, reason="Triton 3.6's interpreter multiplies bf16 tl.dot operands as their "
    "uint16 bit patterns; bf16 runs on a GPU only")


def _attention_inputs(b, n_heads, n_kv, d, s, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)
               for shape in ((b, n_heads, d), (b, n_kv, s, d), (b, n_kv, s, d)))
    return q, k, v


def _attention_positions(b, n_kv, s):
    """0, both sides of the first split boundary, the middle and the last position."""
    split_len = e2e_ops.attention_splits(b, n_kv, s)[1]
    return sorted({p for p in (0, split_len - 1, split_len, s // 2, s - 1) if 0 <= p < s})


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16,
                                   pytest.param(torch.bfloat16, marks=BF16_INTERPRETER)])
@pytest.mark.parametrize("b,n_heads,n_kv,d,s,programs,splits", ATTENTION_CASES)
def test_decode_attention_triton_matches_float64(b, n_heads, n_kv, d, s, programs, splits,
                                                 dtype, monkeypatch, poisoned_attention):
    if programs is not None:
        monkeypatch.setattr(e2e_ops, "_ATTENTION_PROGRAMS", programs)
    assert e2e_ops.attention_splits(b, n_kv, s)[0] == splits
    q, k, v = _attention_inputs(b, n_heads, n_kv, d, s, dtype, seed=s + d + b)
    pos = torch.zeros(1, dtype=torch.int64, device=DEVICE)   # one tensor, advanced in place
    for p in _attention_positions(b, n_kv, s):
        pos.fill_(p)
        # the positions after pos must never be read: NaN there
        k_nan, v_nan = k.clone(), v.clone()
        k_nan[:, :, p + 1:] = float("nan")
        v_nan[:, :, p + 1:] = float("nan")
        out = e2e_ops.decode_attention(q, k_nan, v_nan, pos, "triton")
        assert out.shape == (b, n_heads, d) and out.dtype == dtype
        assert torch.isfinite(out).all(), f"pos {p}"
        err = rel_error(out, _attention_reference(q, k, v, p))
        assert err < TOLERANCE[dtype], f"pos {p}: relative error {err:.2e}"


@needs_triton
def test_decode_attention_triton_is_deterministic():
    q, k, v = _attention_inputs(3, 8, 2, 128, 100, torch.float16, seed=5)
    pos = torch.tensor([77], device=DEVICE)
    first = e2e_ops.decode_attention(q, k, v, pos, "triton")
    assert torch.equal(e2e_ops.decode_attention(q, k, v, pos, "triton"), first)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,n_heads,n_kv,d,s", [(3, 8, 2, 64, 40), (1, 4, 4, 128, 33)])
def test_decode_attention_torch_matches_float64(b, n_heads, n_kv, d, s, dtype):
    """The SDPA path, with the mask built inside and given by the caller as e2e does."""
    q, k, v = _attention_inputs(b, n_heads, n_kv, d, s, dtype, seed=s)
    for p in (0, 17, s - 1):
        pos = torch.tensor([p], device=DEVICE)
        ref = _attention_reference(q, k, v, p)
        out = e2e_ops.decode_attention(q, k, v, pos, "torch")
        assert out.shape == (b, n_heads, d)
        assert rel_error(out, ref) < TOLERANCE[dtype], f"pos {p}"
        mask = (torch.arange(s, device=DEVICE) <= pos).view(1, 1, 1, -1)
        assert torch.equal(e2e_ops.decode_attention(q, k, v, pos, "torch", mask), out)


def test_attention_splits_depend_on_the_shape_only():
    # Llama-3-8B at batch 1: 10 splits of 32 positions (80 programs); batch 16: 2 splits of
    # 192 read 64 at a time; batch 32: one split, no combine pass
    assert e2e_ops.attention_splits(1, 8, 320) == (10, 32, 32)
    assert e2e_ops.attention_splits(16, 8, 320) == (2, 192, 64)
    assert e2e_ops.attention_splits(32, 8, 320) == (1, 320, 64)
    for b, n_kv, s in ((1, 8, 320), (1, 1, 100000), (5, 3, 77), (32, 8, 1), (1, 8, 31)):
        n, split_len, block = e2e_ops.attention_splits(b, n_kv, s)
        assert 1 <= n <= 64 and split_len % block == 0
        assert (n - 1) * split_len < s <= n * split_len       # no split entirely past S


def test_decode_attention_bad_arguments_name_themselves():
    def args(q=(1, 4, 64), kv=(1, 2, 10, 64), dtype=torch.float16, v_dtype=None):
        return (torch.zeros(q, dtype=dtype), torch.zeros(kv, dtype=dtype),
                torch.zeros(kv, dtype=v_dtype or dtype), torch.tensor([3]))
    attn = e2e_ops.decode_attention
    with pytest.raises(ValueError, match=r"head_dim: q has 64, k_cache/v_cache have 32"):
        attn(*args(kv=(1, 2, 10, 32)))
    with pytest.raises(ValueError, match=r"v_cache: expected dtype torch.float16 .*float32"):
        attn(*args(v_dtype=torch.float32))
    with pytest.raises(ValueError, match=r"q: expected n_heads a multiple of n_kv_heads = 2, "
                                         r"got 3"):
        attn(*args(q=(1, 3, 64)))
    with pytest.raises(ValueError, match=r"k_cache/v_cache: expected batch 2"):
        attn(*args(q=(2, 4, 64)))
    with pytest.raises(ValueError, match=r"q: expected \[B, n_heads, head_dim\]"):
        attn(*args(q=(1, 1, 4, 64)))
    q, k, v, _ = args()
    with pytest.raises(ValueError, match=r"k_cache/v_cache: expected two"):
        attn(q, k, v[:, :, :5], torch.tensor([3]))
    with pytest.raises(ValueError, match=r"pos: expected an int64 tensor of shape \[1\]"):
        attn(q, k, v, torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"pos: .* of shape \(2,\)"):
        attn(q, k, v, torch.tensor([3, 4]))
    # what only the Triton kernel needs (checked before it looks for triton)
    with pytest.raises(ValueError, match=r"q: expected dtype float16 or bfloat16 .*float32"):
        attn(*args(dtype=torch.float32), "triton")
    with pytest.raises(ValueError, match=r"head_dim: .*power of two >= 16, got 96"):
        attn(*args(q=(1, 4, 96), kv=(1, 2, 10, 96)), "triton")
    with pytest.raises(ValueError, match=r"k_cache: expected a contiguous tensor"):
        attn(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, torch.tensor([3]),
             "triton")
    with pytest.raises(ValueError, match="impl"):
        attn(q, k, v, torch.tensor([3]), "cutlass")


def test_bad_arguments_name_themselves():
    x = torch.zeros(2, 1, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="impl"):
        e2e_ops.check_impl("cutlass", x.device)
    with pytest.raises(ValueError, match="weight"):
        e2e_ops.add_rmsnorm(x, None, torch.ones(4, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        e2e_ops.add_rmsnorm(x, torch.zeros(2, 8, dtype=torch.float16),
                            torch.ones(8, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match="gate_up"):
        e2e_ops.silu_mul(torch.zeros(2, 7, dtype=torch.float16))
    with pytest.raises(ValueError, match="qkv"):
        e2e_ops.rope_to_cache(torch.zeros(1, 1, 10, dtype=torch.float16), None, None, None,
                              torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), 1, 1)


def test_default_impl_is_torch_off_cuda():
    assert e2e_ops.default_impl(torch.device("cpu")) == "torch"
