"""GPTQ import/export (formats "gptq" v1 and "gptq_v2"), checked three ways:

1. against AutoGPTQ's own code (pip install --no-deps auto-gptq): its QuantLinear.pack
   builds the checkpoint tensors and its CPU forward path dequantizes them;
2. against tensors packed here by plain loops that follow the documented layout;
3. act-order: the sorted weight (dqgemm.act_order.sort_by_group) with permuted activations
   gives the same product as the act-order weight.
"""

import importlib.util
import os

import pytest
import torch

import dqgemm
from dqgemm.act_order import sort_by_group
from dqgemm.formats import from_gptq, to_gptq

from _util import assert_close_product, random_activation


def _auto_gptq_qlinear():
    """AutoGPTQ's qlinear_cuda module, loaded from its file: the package's __init__ pulls
    in optional dependencies (peft, datasets, ...) that the packing code does not need."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None:
        pytest.skip("auto-gptq not installed (pip install --no-deps auto-gptq)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "nn_modules", "qlinear",
                        "qlinear_cuda.py")
    module_spec = importlib.util.spec_from_file_location("_auto_gptq_qlinear_cuda", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def auto_gptq():
    return _auto_gptq_qlinear()


def _problem(n, k, bits, group_size, sym, act_order, seed):
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    groups = k // gs
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).to(torch.float16)
    if sym:
        zeros = torch.full((n, groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        # v1 stores z - 1, so z = 0 cannot be stored; AutoGPTQ's packer also overflows on it.
        zeros = torch.randint(1, 1 << bits, (n, groups), generator=gen, dtype=torch.int32)
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    # The float weight whose rounding gives exactly these codes.
    s = scales.float()[:, g_idx.long()]
    z = zeros.float()[:, g_idx.long()]
    weight = ((codes.float() - z) * s).to(torch.float16)
    return weight, scales, zeros, g_idx, codes


CASES = [
    # n, k, bits, group_size, sym, act_order
    (64, 256, 4, 128, True, False),
    (64, 256, 4, 128, False, False),
    (96, 128, 4, 32, False, True),
    (32, 256, 4, -1, False, False),
    (64, 256, 8, 64, False, False),
    (64, 128, 8, 32, True, True),
    (96, 192, 8, -1, True, False),     # AutoGPTQ sizes qzeros as N // 32 * bits: N % 32 == 0
]


@pytest.mark.parametrize("n,k,bits,group_size,sym,act_order", CASES)
def test_matches_auto_gptq(auto_gptq, n, k, bits, group_size, sym, act_order):
    weight, scales, zeros, g_idx, codes = _problem(n, k, bits, group_size, sym, act_order,
                                                   seed=n + k + bits)
    layer = auto_gptq.QuantLinear(bits, group_size, k, n, bias=False)
    linear = torch.nn.Linear(k, n, bias=False, dtype=torch.float16)
    linear.weight.data = weight.clone()
    layer.pack(linear, scales, zeros, g_idx=g_idx if act_order else None)

    qw = from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits=bits,
                   group_size=group_size, checkpoint_format="gptq")
    assert qw.shape == (n, k)
    assert torch.equal(qw.codes().long(), codes)
    assert (qw.g_idx is not None) == act_order
    assert qw.zero_mode == ("symmetric" if sym else "zero_points")

    # AutoGPTQ's own dequantization: its CPU forward on the identity gives W^T in fp16.
    with torch.no_grad():
        theirs = layer(torch.eye(k, dtype=torch.float16)).t()
    ours = qw.dequantize(torch.float32).to(torch.float16)
    assert torch.equal(ours, theirs)

    # Export: v1 reproduces AutoGPTQ's tensors bit for bit; v2 adds 1 to every zero field,
    # which for v1 fields below 2**b - 1 is GPTQModel's v1 -> v2 word addition.
    v1 = to_gptq(qw, "gptq")
    assert torch.equal(v1["qweight"], layer.qweight)
    assert torch.equal(v1["qzeros"], layer.qzeros)
    assert torch.equal(v1["scales"], layer.scales)
    v2 = to_gptq(qw, "gptq_v2")
    ones = sum(1 << s for s in range(0, 32, bits))           # 0x11111111 / 0x01010101
    added = (layer.qzeros.long() + ones) & 0xFFFFFFFF
    assert torch.equal(v2["qzeros"].long() & 0xFFFFFFFF, added)
    again = from_gptq(v2["qweight"], v2["qzeros"], v2["scales"], v2["g_idx"], bits=bits,
                      group_size=group_size, checkpoint_format="gptq_v2")
    assert torch.equal(again.dequantize(), qw.dequantize())


def _pack_by_loops(codes_kn, bits, dim):
    """Plain-loop packing of the documented layout: field j of a word at bits [b*j, b*j+b)."""
    per = 32 // bits
    rows, cols = codes_kn.shape
    if dim == 0:
        out = torch.zeros(rows // per, cols, dtype=torch.int64)
        for r in range(rows):
            out[r // per] |= codes_kn[r].long() << (bits * (r % per))
    else:
        out = torch.zeros(rows, cols // per, dtype=torch.int64)
        for c in range(cols):
            out[:, c // per] |= codes_kn[:, c].long() << (bits * (c % per))
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_documented_layout(bits, checkpoint_format):
    n, k, gs = 24, 96, 32
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen)          # [K, N]
    zeros = torch.randint(0, 1 << bits, (k // gs, n), generator=gen)    # z, [G, N]
    scales = torch.rand(k // gs, n, generator=gen).to(torch.float16) + 0.01
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros
    stored = stored & ((1 << bits) - 1)     # z = 0 in v1 wraps to 2**b - 1 (read as 2**b)
    qweight = _pack_by_loops(codes, bits, dim=0)
    qzeros = _pack_by_loops(stored, bits, dim=1)
    qw = from_gptq(qweight, qzeros, scales, bits=bits, group_size=gs,
                   checkpoint_format=checkpoint_format)
    z = stored + 1 if checkpoint_format == "gptq" else stored
    expected = (codes - z.repeat_interleave(gs, 0)).float() * scales.float().repeat_interleave(gs, 0)
    assert torch.equal(qw.dequantize(), expected.t())


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 64)])
def test_act_order_sorted_weight_gives_same_product(bits, group_size):
    n, k = 80, 256
    weight, scales, zeros, g_idx, codes = _problem(n, k, bits, group_size, False, True, seed=5)
    # Pack per the layout (no framework needed): codes [K, N], zeros minus one.
    qw = from_gptq(_pack_by_loops(codes.t().contiguous(), bits, 0),
                   _pack_by_loops((zeros - 1).t().contiguous(), bits, 1),
                   scales.t().contiguous(), g_idx, bits=bits, group_size=group_size)
    assert qw.g_idx is not None
    sorted_qw, perm = sort_by_group(qw)
    assert sorted_qw.g_idx is None
    # The sorted weight is the original with its columns permuted, exactly.
    assert torch.equal(sorted_qw.dequantize(), qw.dequantize()[:, perm])
    for dtype in (torch.float16, torch.bfloat16):
        x = random_activation((7, k), dtype)
        want = dqgemm.matmul(x, qw, backend="reference")
        got = dqgemm.matmul(x[:, perm], sorted_qw, backend="reference")
        assert_close_product(got, x, qw.dequantize())
        assert_close_product(want, x, qw.dequantize())


def test_trivial_g_idx_is_dropped():
    n, k, gs = 32, 128, 32
    weight, scales, zeros, g_idx, codes = _problem(n, k, 4, gs, False, False, seed=9)
    qw = from_gptq(_pack_by_loops(codes.t().contiguous(), 4, 0),
                   _pack_by_loops((zeros - 1).t().contiguous(), 4, 1),
                   scales.t().contiguous(), g_idx, bits=4, group_size=gs)
    assert qw.g_idx is None


def _valid(bits=4, n=32, k=128, gs=32):
    per = 32 // bits
    return dict(qweight=torch.zeros(k // per, n, dtype=torch.int32),
                qzeros=torch.zeros(k // gs, n // per, dtype=torch.int32),
                scales=torch.ones(k // gs, n, dtype=torch.float16))


def test_errors():
    t = _valid()
    name = "model.layers.0.mlp.up_proj"
    # An 8-bit checkpoint read as 4-bit: qweight has K/4 rows, not K/8.
    t8 = _valid(bits=8)
    with pytest.raises(ValueError, match=rf"{name}\.qweight: expected shape \(16, 32\) "
                                         r"\(\[K\*bits/32, N\] for K=128, N=32, bits=4\), got "
                                         r"\(32, 32\)"):
        from_gptq(**t8, bits=4, group_size=32, name=name, in_features=128, out_features=32)
    with pytest.raises(ValueError, match=r"scales: expected shape \(2, 32\)"):
        from_gptq(**t, bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"qzeros: expected shape \(4, 4\)"):
        from_gptq(t["qweight"], torch.zeros(4, 3, dtype=torch.int32), t["scales"], group_size=32)
    bad_g = torch.arange(128, dtype=torch.int32) // 32
    bad_g[5] = 4
    with pytest.raises(ValueError, match=rf"{name}\.g_idx: expected values in \[0, 3\] "
                                         r"\(4 groups\), got range \[0, 4\]"):
        from_gptq(**t, g_idx=bad_g, group_size=32, name=name)
    with pytest.raises(ValueError, match=r"g_idx: expected shape \(128,\)"):
        from_gptq(**t, g_idx=bad_g[:100], group_size=32)
    with pytest.raises(ValueError, match="checkpoint_format: expected one of"):
        from_gptq(**t, group_size=32, checkpoint_format="marlin")
    with pytest.raises(ValueError, match=r"bits: expected bits in \(4, 8\), got 3"):
        from_gptq(**t, bits=3, group_size=32)
    with pytest.raises(TypeError, match=r"qweight: expected dtype in"):
        from_gptq(t["qweight"].float(), t["qzeros"], t["scales"], group_size=32)
    with pytest.raises(ValueError, match="group_size=48"):
        from_gptq(_valid(k=96, gs=48)["qweight"], torch.zeros(2, 4, dtype=torch.int32),
                  torch.ones(2, 32, dtype=torch.float16), group_size=48)
    # Exporter refusals.
    offsets_weight = dqgemm.formats.from_gguf(
        torch.zeros(32 * 4 * 20, dtype=torch.uint8), "Q4_1", (32, 128))
    with pytest.raises(ValueError, match="offsets: GPTQ cannot store an additive offset"):
        to_gptq(offsets_weight)
    zero_z = dqgemm.quantize(torch.rand(32, 128), bits=4, group_size=32, symmetric=False)
    zero_z = zero_z.replace(zero_points=torch.zeros_like(zero_z.zero_points))
    with pytest.raises(ValueError, match=r"zero_points: expected zero points in \[1, 16\]"):
        to_gptq(zero_z, "gptq")
    assert to_gptq(zero_z, "gptq_v2")["qzeros"].abs().sum() == 0


def test_act_order_checkpoint_on_triton_kernel(monkeypatch):
    """An act-order GPTQ layer on the Triton kernel (its CPU interpreter without a GPU): the
    kernel's prepared weight is sorted by group once (act_index = the column permutation,
    groups contiguous), and the product matches the float64 reference."""
    pytest.importorskip("triton")
    from dqgemm import ops
    n, k, bits, gs = 64, 256, 4, 32
    weight, scales, zeros, g_idx, codes = _problem(n, k, bits, gs, False, True, seed=21)
    qw = from_gptq(_pack_by_loops(codes.t().contiguous(), bits, 0),
                   _pack_by_loops((zeros - 1).t().contiguous(), bits, 1),
                   scales.t().contiguous(), g_idx, bits=bits, group_size=gs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qw = qw.to(device)
    x = random_activation((4, k), torch.float16, device=device)
    # Every fused family is launched without the permutation (x already gathered, once);
    # only the dequant family gets it, to gather x into its own buffer outside the kernel.
    from dqgemm.kernels import triton_dequant, triton_gemm, triton_gemv, triton_splitk
    launched = []
    for module in (triton_gemm, triton_gemv, triton_splitk, triton_dequant):
        def recording(x_, args, *rest, _module=module, _launch=module.launch):
            launched.append((_module.__name__, args.perm))
            return _launch(x_, args, *rest)
        monkeypatch.setattr(module, "launch", recording)
    out = dqgemm.matmul(x, qw, backend="triton")
    assert_close_product(out, x, qw.dequantize())
    assert len(launched) == 1
    family, perm = launched[0]
    assert perm is None or family.endswith("triton_dequant"), launched
    problem = ops.make_problem(x, qw.qdata, qw.scales, qw.zero_points, qw.offsets, qw.g_idx,
                               bits, gs)
    kernel = ops.select_kernel(problem, "triton")
    prepared = ops.prepared_for(kernel, qw.qdata, qw.scales, qw.zero_points, qw.offsets,
                                qw.g_idx, bits, gs, k)
    _, perm = sort_by_group(qw)
    assert prepared.act_index is not None
    assert torch.equal(prepared.act_index.long().cpu(), perm.cpu())


@pytest.mark.parametrize("bits", [4, 8])
def test_byte_reinterpretation_matches_unpacking(monkeypatch, bits):
    """GPTQ/compressed-tensors words are read as kpack-v1 bytes on little-endian hosts; the
    portable unpack-and-repack path must give the same qdata."""
    import sys
    n, k, gs = 40, 96, 32
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen)
    args = (_pack_by_loops(codes, bits, 0),
            _pack_by_loops(torch.randint(0, 1 << bits, (k // gs, n), generator=gen), bits, 1),
            torch.rand(k // gs, n, generator=gen).half())
    fast = from_gptq(*args, bits=bits, group_size=gs)
    monkeypatch.setattr(sys, "byteorder", "big")
    portable = from_gptq(*args, bits=bits, group_size=gs)
    assert torch.equal(fast.qdata, portable.qdata)
    assert torch.equal(portable.codes().long(), codes.t())
