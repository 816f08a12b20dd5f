"""The reference backend and the public matmul: results, shapes, autograd, opcheck, errors."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dqgemm
from _util import assert_close_product, random_activation, random_weight


def _qweight(n=24, k=128, bits=4, group_size=32, mode="symmetric", act_order=False, seed=0):
    qw = dqgemm.quantize(random_weight(n, k, seed=seed), bits, group_size,
                         symmetric=mode != "zero_points")
    if mode == "offsets":
        qw = qw.replace(offsets=torch.randn(n, qw.num_groups).half() * 0.01)
    if act_order:
        g = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        qw = qw.replace(g_idx=(g % qw.num_groups).to(torch.int32))
    return qw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["symmetric", "zero_points", "offsets"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_reference_matches_float64(dtype, mode, bits, act_order):
    qw = _qweight(bits=bits, mode=mode, act_order=act_order)
    x = random_activation((5, 128), dtype)
    bias = torch.randn(24)
    out = dqgemm.matmul(x, qw, bias, backend="reference")
    assert out.dtype == dtype and out.shape == (5, 24)
    assert_close_product(out, x, qw.dequantize(), bias, dtype)


def test_auto_on_cpu_uses_reference_and_leading_dims():
    qw = _qweight()
    x = random_activation((2, 3, 4, 128), torch.float32)
    out = dqgemm.matmul(x, qw)
    assert out.shape == (2, 3, 4, 24)
    expected = dqgemm.matmul(x.reshape(-1, 128), qw, backend="reference").reshape(2, 3, 4, 24)
    assert torch.equal(out, expected)
    assert "selected: reference" in dqgemm.explain(x, qw)


@pytest.mark.parametrize("make", [
    lambda: random_activation((128, 10), torch.float32).t(),              # transposed
    lambda: random_activation((10, 256), torch.float16)[:, ::2],          # strided columns
    lambda: random_activation((1, 128), torch.bfloat16).expand(6, 128),   # stride-0 rows
    lambda: random_activation((4, 128, 3), torch.float32).transpose(1, 2),  # 3-D, permuted
    lambda: random_activation((20, 128), torch.float32)[::3],             # strided rows
], ids=["transposed", "strided-cols", "expanded", "3d-permuted", "strided-rows"])
def test_non_contiguous_input_gives_the_contiguous_result(make):
    qw = _qweight()
    x = make()
    assert not x.is_contiguous()
    out = dqgemm.matmul(x, qw)
    assert out.shape == x.shape[:-1] + (24,)
    assert torch.equal(out, dqgemm.matmul(x.contiguous(), qw))


def test_empty_input_returns_empty():
    qw = _qweight()
    out = dqgemm.matmul(torch.empty(0, 128), qw)
    assert out.shape == (0, 24)
    out = dqgemm.matmul(torch.empty(3, 0, 128, dtype=torch.float16), qw)
    assert out.shape == (3, 0, 24) and out.dtype == torch.float16


@pytest.mark.parametrize("make,exc,match", [
    (lambda qw: (torch.randn(2, 127), qw, None), ValueError,
     r"x: expected shape \[\.\.\., 128\]"),
    (lambda qw: (torch.randint(0, 2, (2, 128)), qw, None), TypeError, "x: expected dtype"),
    (lambda qw: (torch.randn(2, 128).double(), qw, None), TypeError, "x: expected dtype"),
    (lambda qw: ("x", qw, None), TypeError, "x: expected a torch.Tensor"),
    (lambda qw: (torch.randn(2, 128), qw.qdata, None), TypeError, "qweight: expected"),
    (lambda qw: (torch.randn(2, 128), qw, torch.randn(23)), ValueError,
     r"bias: expected shape \(24,\)"),
    (lambda qw: (torch.randn(2, 128), qw, torch.ones(24, dtype=torch.int64)), TypeError,
     "bias: expected a floating-point"),
    (lambda qw: (torch.randn(2, 128, device="meta"), qw, None), ValueError,
     "x: expected device cpu"),
    (lambda qw: (torch.randn(2, 128), qw.to("meta"), None), ValueError,
     r"x: expected device meta \(where the quantized weight is\), got cpu"),
    (lambda qw: (torch.randn(2, 128), qw, torch.randn(24, device="meta")), ValueError,
     "bias: expected device cpu, got meta"),
    (lambda qw: (torch.tensor(1.0), qw, None), ValueError, r"x: expected shape \[\.\.\., 128\]"),
    (lambda qw: (torch.randn(2, 128), qw, torch.randn(1, 24)), ValueError,
     r"bias: expected shape \(24,\), got \(1, 24\)"),
])
def test_bad_input_is_named(make, exc, match):
    x, qw, bias = make(_qweight())
    with pytest.raises(exc, match=match):
        dqgemm.matmul(x, qw, bias)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend: expected one of"):
        dqgemm.matmul(torch.randn(2, 128), _qweight(), backend="fast")


def test_backend_without_kernel_explains_why():
    with pytest.raises(ValueError, match="cuda_dequant_gemm"):
        dqgemm.matmul(torch.randn(2, 128).half(), _qweight(), backend="cuda")


def test_gradient_with_respect_to_input_and_bias():
    qw = _qweight(mode="zero_points", act_order=True)
    x = random_activation((3, 128), torch.float32).requires_grad_()
    bias = torch.randn(24, requires_grad=True)
    out = dqgemm.matmul(x, qw, bias)
    grad = torch.randn_like(out)
    out.backward(grad)
    w = qw.dequantize()
    torch.testing.assert_close(x.grad, grad @ w)
    torch.testing.assert_close(bias.grad, grad.sum(0))


@pytest.mark.parametrize("mode", ["symmetric", "zero_points", "offsets"])
@pytest.mark.parametrize("act_order", [False, True])
def test_opcheck(mode, act_order):
    qw = _qweight(mode=mode, act_order=act_order)
    x = random_activation((3, 128), torch.float32).requires_grad_()
    bias = torch.randn(24)
    args = (x, qw.qdata, qw.scales, qw.zero_points, qw.offsets, qw.g_idx, bias, qw.bits,
            qw.group_size, "auto")
    torch.library.opcheck(torch.ops.dqgemm.matmul.default, args)


@settings(max_examples=40, deadline=None, derandomize=True)   # the same examples in every CI run
@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), n=st.integers(1, 40),
       k_groups=st.integers(1, 3), group_size=st.sampled_from([32, 64, 128, 256, -1]),
       bits=st.sampled_from([4, 8]), mode=st.sampled_from(["symmetric", "zero_points",
                                                           "offsets"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_matmul_matches_float64(lead, n, k_groups, group_size, bits, mode, dtype,
                                         with_bias, seed):
    k = k_groups * (group_size if group_size > 0 else 48)
    w = random_weight(n, k, seed=seed)
    qw = dqgemm.quantize(w, bits, group_size, zero_mode=mode)
    x = random_activation((*lead, 3, k), dtype, seed=seed + 1)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if with_bias else None
    out = dqgemm.matmul(x, qw, bias)
    assert out.shape == (*lead, 3, n) and out.dtype == dtype
    if out.numel():
        assert_close_product(out.reshape(-1, n), x.reshape(-1, k), qw.dequantize(), bias, dtype)
