"""AWQ (GEMM layout) import/export, checked against AutoAWQ's own code
(pip install --no-deps autoawq): WQLinear_GEMM.from_linear packs the checkpoint tensors and
awq.utils.packing_utils.dequantize_gemm dequantizes them; and against tensors packed here
by plain loops following the documented layout.
"""

import importlib
import importlib.util
import sys
import types

import pytest
import torch

import dqgemm
from dqgemm.formats import from_awq, to_awq

from _util import assert_close_product, random_activation


@pytest.fixture(scope="module")
def awq():
    """AutoAWQ's gemm and packing modules, imported without running awq/__init__.py (which
    imports the whole model zoo and `datasets`). A stand-in package object points at the
    installed folder; the real modules are removed from sys.modules afterwards."""
    spec = importlib.util.find_spec("awq")
    if spec is None:
        pytest.skip("autoawq not installed (pip install --no-deps autoawq)")
    pytest.importorskip("accelerate")       # awq.utils.utils imports it
    saved = {k: v for k, v in sys.modules.items() if k == "awq" or k.startswith("awq.")}
    stub = types.ModuleType("awq")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["awq"] = stub
    try:
        gemm = importlib.import_module("awq.modules.linear.gemm")
        packing = importlib.import_module("awq.utils.packing_utils")
    finally:
        for key in [k for k in sys.modules if k == "awq" or k.startswith("awq.")]:
            del sys.modules[key]
        sys.modules.update(saved)
    return types.SimpleNamespace(WQLinear_GEMM=gemm.WQLinear_GEMM,
                                 dequantize_gemm=packing.dequantize_gemm)


def _problem(n, k, group_size, sym, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).to(torch.float16)
    if sym:
        zeros = torch.full((groups, n), 8, dtype=torch.int32)
    else:
        zeros = torch.randint(0, 16, (groups, n), generator=gen, dtype=torch.int32)
    codes = torch.randint(0, 16, (k, n), generator=gen)                      # [K, N]
    w_kn = (codes - zeros.repeat_interleave(group_size, 0)).float() * \
        scales.float().repeat_interleave(group_size, 0)
    return w_kn.t().contiguous().to(torch.float16), scales, zeros, codes


@pytest.mark.parametrize("n,k,group_size,sym", [
    (64, 256, 128, False), (64, 256, 128, True), (160, 192, 64, False), (32, 128, 32, False),
])
def test_matches_autoawq(awq, n, k, group_size, sym):
    weight, scales, zeros, codes = _problem(n, k, group_size, sym, seed=n + k)
    linear = torch.nn.Linear(k, n, bias=False, dtype=torch.float16)
    linear.weight.data = weight.clone()
    layer = awq.WQLinear_GEMM.from_linear(linear, 4, group_size, scales=scales, zeros=zeros)
    qw = from_awq(layer.qweight, layer.qzeros, layer.scales, group_size=group_size)
    assert torch.equal(qw.codes().long(), codes.t())
    assert qw.zero_mode == ("symmetric" if sym else "zero_points")
    theirs = awq.dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, group_size)
    ours = qw.dequantize(torch.float32).to(torch.float16)
    assert torch.equal(ours, theirs.t())
    back = to_awq(qw)
    assert torch.equal(back["qweight"], layer.qweight)
    assert torch.equal(back["qzeros"], layer.qzeros)
    assert torch.equal(back["scales"], layer.scales)


def _pack_awq_by_loops(values_rn):
    """[R, N] nibbles -> [R, N/8] words: field i of word c = column 8c + ORDER[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = values_rn.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            out[:, c] |= values_rn[:, 8 * c + order[i]].long() << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_documented_layout():
    n, k, gs = 24, 64, 32
    weight, scales, zeros, codes = _problem(n, k, gs, False, seed=1)
    qw = from_awq(_pack_awq_by_loops(codes), _pack_awq_by_loops(zeros), scales, group_size=gs)
    expected = (codes - zeros.repeat_interleave(gs, 0)).float() * \
        scales.float().repeat_interleave(gs, 0)
    assert torch.equal(qw.dequantize(), expected.t())
    x = random_activation((3, k), torch.float16)
    assert_close_product(dqgemm.matmul(x, qw, backend="reference"), x, expected.t())


def test_errors():
    qweight = torch.zeros(128, 4, dtype=torch.int32)
    qzeros = torch.zeros(4, 4, dtype=torch.int32)
    scales = torch.ones(4, 32, dtype=torch.float16)
    name = "model.layers.3.self_attn.o_proj"
    with pytest.raises(ValueError, match=rf"{name}\.bits: expected 4"):
        from_awq(qweight, qzeros, scales, group_size=32, bits=8, name=name)
    with pytest.raises(ValueError, match=rf"{name}\.scales: expected shape \(2, 32\)"):
        from_awq(qweight, qzeros, scales, group_size=64, name=name)
    # The GEMV layout ([N, K/8]) is not the GEMM layout: the shape check says so.
    with pytest.raises(ValueError, match=r"qweight: expected shape \(128, 4\)"):
        from_awq(torch.zeros(32, 16, dtype=torch.int32), qzeros, scales, group_size=32,
                 in_features=128, out_features=32)
    with pytest.raises(ValueError, match="qzeros: expected shape"):
        from_awq(qweight, qzeros[:, :3], scales, group_size=32)
    with pytest.raises(ValueError, match="AWQ holds 4-bit weights only"):
        to_awq(dqgemm.quantize(torch.randn(16, 64), bits=8, group_size=32))
