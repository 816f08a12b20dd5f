"""The CUDA chain: build -> bind -> launch on torch's current stream -> compare.

GPU tests skip without a CUDA device; the extension tests run wherever it was built.
"""

import pytest
import torch

import dqgemm
from dqgemm import _ext
from dqgemm.kernels.cuda_dequant import dequantize_into
from _util import assert_close_product, random_activation, random_weight

needs_gpu = pytest.mark.skipif(_ext.cuda_unavailable_reason() is not None,
                               reason=f"CUDA kernels unavailable: {_ext.cuda_unavailable_reason()}")


def test_import_does_not_initialize_cuda():
    import subprocess
    import sys
    code = ("import dqgemm, torch, sys; dqgemm.QuantLinear; "
            "sys.exit(1 if torch.cuda.is_initialized() else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.skipif(_ext.extension() is None, reason="CUDA extension not built")
def test_extension_reports_driver_state_without_crashing():
    ext = _ext.extension()
    assert ext.runtime_version() >= 12000
    try:
        count = ext.device_count()
    except RuntimeError as exc:  # no driver on CPU machines: a clear error, not a crash
        assert "dqgemm.device_count: CUDA error" in str(exc)
    else:
        assert count >= 0


def _qweight(n, k, bits, group_size, mode, act_order, scale_dtype, seed):
    qw = dqgemm.quantize(random_weight(n, k, seed=seed), bits, group_size,
                         symmetric=mode != "zero_points", scale_dtype=scale_dtype)
    if mode == "offsets":
        gen = torch.Generator().manual_seed(seed)
        qw = qw.replace(offsets=(torch.randn(n, qw.num_groups, generator=gen) * 0.01)
                        .to(scale_dtype))
    if act_order:
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed + 1))
        qw = qw.replace(g_idx=(perm % qw.num_groups).to(torch.int32))
    return qw


CASES = [
    # n, k, bits, group_size, mode, act_order, scale_dtype
    (256, 512, 4, 128, "symmetric", False, torch.float16),
    (576, 1536, 4, 32, "zero_points", False, torch.float16),
    (96, 576, 4, 64, "offsets", False, torch.float32),
    (128, 256, 8, -1, "symmetric", False, torch.bfloat16),
    (130, 11008 // 4, 8, 64, "zero_points", True, torch.float16),
    (64, 256, 4, 128, "symmetric", True, torch.float16),
    (40, 200, 4, -1, "zero_points", False, torch.float16),  # K % 32 != 0: vec8 path
    (24, 72, 8, -1, "offsets", False, torch.bfloat16),      # K % 16 != 0: vec8 path
    (33, 100, 4, -1, "symmetric", False, torch.float16),   # K % 8 != 0: scalar path
    (17, 99, 8, -1, "zero_points", False, torch.float16),  # odd K
]


@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-int{c[2]}-g{c[3]}-{c[4]}")
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_dequantize_kernel_matches_reference(case, out_dtype):
    n, k, bits, gs, mode, act_order, scale_dtype = case
    qw = _qweight(n, k, bits, gs, mode, act_order, scale_dtype, seed=n + k).cuda()
    prepared = dqgemm.registry.get_kernel("cuda_dequant_gemm").prepare(qw)
    out = torch.full((n, k), float("nan"), dtype=out_dtype, device="cuda")  # poisoned
    stream = torch.cuda.Stream()
    # the poison fill and the prepared tensors were written on the current stream: the
    # kernel's stream must wait for them (without this the fill could land after the kernel
    # and the test would see NaN, as it once did on an H200)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        zeros = prepared.zero_points if mode == "zero_points" else prepared.offsets
        dequantize_into(out, prepared.packed, prepared.scales, zeros, mode, prepared.g_idx,
                        bits, gs)
    stream.synchronize()
    expected = qw.dequantize(torch.float32).to(out_dtype)
    if prepared.act_index is not None:   # act-order: columns sorted by group at load time
        expected = expected[:, prepared.act_index]
    # Same fp32 arithmetic, one rounding to out_dtype: identical up to fma contraction.
    torch.testing.assert_close(out, expected, rtol=1e-3 if out_dtype == torch.float16 else 8e-3,
                               atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: f"{c[0]}x{c[1]}-int{c[2]}-{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17, 257])
def test_cuda_dequant_gemm_matches_float64(case, dtype, m):
    n, k, bits, gs, mode, act_order, scale_dtype = case
    qw = _qweight(n, k, bits, gs, mode, act_order, scale_dtype, seed=m).cuda()
    x = random_activation((m, k), dtype, seed=m, device="cuda")
    bias = torch.randn(n, device="cuda", dtype=dtype)
    out = dqgemm.matmul(x, qw, bias, backend="cuda")
    assert_close_product(out, x, qw.dequantize(), bias, dtype)


@needs_gpu
def test_quantized_weight_moves_and_runs_in_cuda_graph():
    qw = _qweight(512, 1024, 4, 128, "symmetric", False, torch.float16, seed=3).cuda()
    x = random_activation((8, 1024), torch.float16, device="cuda")
    out = dqgemm.matmul(x, qw, backend="cuda")          # warm-up: prepares the layout
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = dqgemm.matmul(x, qw, backend="cuda")
    x.copy_(random_activation((8, 1024), torch.float16, seed=9, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_product(graph_out, x, qw.dequantize())
    assert not torch.equal(graph_out, out)


@needs_gpu
def test_quantlinear_cuda_matches_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 576).half()
    q = dqgemm.QuantLinear.from_linear(lin, bits=4, group_size=64).cuda()
    x = torch.randn(3, 5, 1536, device="cuda", dtype=torch.float16)
    out = q(x)
    ref = dqgemm.QuantLinear.from_linear(lin, bits=4, group_size=64, backend="reference").cuda()
    assert_close_product(out.reshape(-1, 576), x.reshape(-1, 1536), q.dequantize(),
                         q.bias.float())
    torch.testing.assert_close(out, ref(x), rtol=2e-2, atol=2e-3)


def test_dequant_gemm_prepare_sorts_act_order_groups():
    """Act-order weights are sorted by group at load time (x is gathered once per call and
    the dequantize kernel reads groups in order); only irregular groups keep the g_idx."""
    kernel = dqgemm.registry.get_kernel("cuda_dequant_gemm")
    regular = _qweight(64, 256, 4, 64, "symmetric", True, torch.float16, seed=3)
    prepared = kernel.prepare(regular)
    assert prepared.g_idx is None and prepared.act_index is not None
    # the sorted weight, read in order, equals the original with its columns permuted
    codes = dqgemm.format.unpack_codes(prepared.packed, 4, 256)
    assert torch.equal(codes, regular.codes()[:, prepared.act_index])
    g_idx = torch.arange(256, dtype=torch.int32) // 64
    g_idx[0], g_idx[255] = 3, 0       # still in range, but group sizes stay 64 ...
    g_idx[1] = 3                      # ... except these: group 3 holds 65 columns
    irregular = regular.replace(g_idx=g_idx)
    prepared = kernel.prepare(irregular)
    assert prepared.act_index is None and torch.equal(prepared.g_idx, g_idx)
