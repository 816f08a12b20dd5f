"""The reference backend and the public matmul: results, shapes, autograd, opcheck, errors."""

import pytest
import torch

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


def test_non_contiguous_input_gives_the_contiguous_result():
    qw = _qweight()
    base = random_activation((128, 10), torch.float32)
    x = base.t()
    assert not x.is_contiguous()
    assert torch.equal(dqgemm.matmul(x, qw), dqgemm.matmul(x.contiguous(), qw))


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
