"""The fused elementwise ops of the end-to-end benchmark (dqgemm.bench.e2e_ops): the Triton
kernels against the torch implementation (the benchmark's original arithmetic).

Without a GPU the Triton kernels run in the interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1); with one, on CUDA tensors. Outputs are poisoned with NaN before
each kernel; odd sizes (a hidden size that is not a power of two, 3 sequences, a
position inside the cache) are included.
"""

from __future__ import annotations

import os

import pytest
import torch

from dqgemm.bench import e2e_ops
from _util import rel_error

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
