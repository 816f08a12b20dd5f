"""The Triton backend (kernels/triton_*.py) against the float64 reference.

On a machine without a GPU (CI) the kernels run in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before dqgemm is imported): a reduced fp16 sweep, shapes <= 256,
every family forced, every group size / zero mode / bits, act-order, split-K reduction.
On a GPU: the full sweep of the issue (M in 1, 3, 16, 17, 64, 129, 1024; K = 576, 1536,
11008 and powers of two; N = 6144, 576; every group size; fp16 and bf16), through the
public dqgemm.matmul (dispatch and config table included) and with each family forced,
plus CUDA-graph capture and torch.compile.

Every output (and every cached split-K workspace) is poisoned with NaN before a launch.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import dqgemm
from dqgemm import registry
from dqgemm.kernels import triton_common as tc

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

needs_triton = pytest.mark.skipif(tc.TRITON_IMPORT_ERROR is not None,
                                  reason=str(tc.TRITON_IMPORT_ERROR))
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_cpu_interpreter = pytest.mark.skipif(
    HAS_GPU or not (INTERPRET and tc.INTERPRET_AT_IMPORT),
    reason="CPU-interpreter tests run where there is no GPU (TRITON_INTERPRET=1)")


# ----------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------

def seed_of(*parts) -> int:
    """A per-case seed, stable across processes (hash() of str is salted per process)."""
    return zlib.crc32(repr(parts).encode()) % 100000


def make_weight(n, k, bits, group_size, mode, act_order, scale_dtype, seed, device):
    """A fresh random quantized weight; mode in symmetric / zero_points / offsets."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    qw = dqgemm.quantize(w, bits=bits, group_size=group_size,
                         symmetric=mode == "symmetric", scale_dtype=scale_dtype)
    if mode == "offsets":
        # w = q*s + o with o = -z*s plus a fractional jitter (GGUF Q4_1-like).
        o = -qw.zero_points.float() * qw.scales.float()
        o = o + torch.rand(o.shape, generator=gen) * qw.scales.float()
        qw = qw.replace(zero_points=None, offsets=o.to(scale_dtype))
    elif mode == "zero_points" and seed % 2:
        # fractional (HQQ-like) zero points on every other weight
        zp = qw.zero_points.float() + torch.rand(qw.zero_points.shape, generator=gen) - 0.5
        qw = qw.replace(zero_points=zp.to(scale_dtype))
    if act_order:
        perm = torch.randperm(k, generator=gen)
        qw = qw.replace(g_idx=(perm % qw.num_groups).to(torch.int32))
    return qw.to(device)


def rel_error(out, x, qw, bias=None):
    """Relative Frobenius error vs float64 x @ dequant(W)^T (+ bias), on x's device."""
    w = qw.dequantize(torch.float64)
    ref = x.double() @ w.t()
    if bias is not None:
        ref = ref + bias.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten or overflowed)"
    return ((out.double() - ref).norm() / ref.norm()).item()


def poison_workspaces():
    for buf in tc._WORKSPACES.values():
        buf.fill_(float("nan"))


def run_forced(x, qw, cfg, bias=None):
    """One family/config on a poisoned output, bypassing dispatch."""
    prepared = tc.prepare_weight(qw)
    spec = registry.WeightSpec(qw.bits, qw.group_size, qw.in_features, qw.out_features)
    args = tc.launch_args(prepared, spec)
    poison_workspaces()
    out = torch.full((x.shape[0], qw.out_features), float("nan"), dtype=x.dtype,
                     device=x.device)
    tc.run_with_config(x.contiguous(), args, bias, cfg, out)
    return out


def activations(m, k, dtype, seed, device):
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(m, k, generator=gen).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------
# Layout and config data (run everywhere, no kernel launch).
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,k", [(4, 256), (4, 77), (8, 64), (8, 5)])
def test_pack_words_round_trip(bits, k):
    codes = torch.randint(0, 1 << bits, (37, k), dtype=torch.uint8)
    words = tc.pack_words(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (-(-k // (32 // bits)), 37)
    assert torch.equal(tc.unpack_words(words, bits, k), codes)
    # word r, field j holds code k = E*r + j (the layout the kernels assume)
    e = 32 // bits
    assert (int(words[0, 5]) >> bits) & ((1 << bits) - 1) == int(codes[5, 1])
    assert (int(words[1, 2]) & ((1 << bits) - 1)) == int(codes[2, e])


def test_prepare_sorts_act_order_and_transposes():
    qw = make_weight(48, 128, 4, 32, "zero_points", True, torch.float16, 3, "cpu")
    p = tc.prepare_weight(qw)
    assert p.act_index is not None and p.act_index.dtype == torch.int32
    assert p.scales.shape == (4, 48) and p.zero_points.dtype == torch.float32
    # the sorted weight, read through the permutation, is the original one
    sorted_codes = tc.unpack_words(p.packed, 4, 128)
    assert torch.equal(sorted_codes, qw.codes()[:, p.act_index.long()])


def test_config_table_is_valid():
    table = tc.config_table()
    for gpu, entries in table:
        assert gpu, "every table needs a device_name substring"
        for e in entries:
            c = e.config
            assert c.family in tc.FAMILIES
            if c.family == "splitk":
                assert c.block_k % (32 // (e.bits or 4)) == 0 and c.block_m >= 16, e
                if c.planes:
                    assert c.block_k // (32 // (e.bits or 4)) >= 16, e
            if c.family == "gemv":
                assert e.m_max == 1, e
            assert c.block_n & (c.block_n - 1) == 0 and c.num_warps in (1, 2, 4, 8, 16)


@pytest.mark.parametrize("m,family,device", [
    (1, "gemv", "cuda"), (2, "splitk", "cuda"), (16, "splitk", "cuda"), (64, "splitk", "cuda"),
    (65, "dequant", "cuda"), (4096, "dequant", "cuda"), (4096, "splitk", "cpu")])
def test_heuristic_family_by_m(m, family, device):
    # torch.device("cuda") is only a name here: the heuristic queries nothing
    assert tc.heuristic_config(4, 128, m, 4096, 4096, torch.device(device)).family == family


def test_split_count_fills_the_machine():
    cfg = tc.TritonConfig("splitk", block_m=16, block_n=128, block_k=128)
    splits, per = tc.split_count(cfg, tiles_mn=32, k_steps=32, device=torch.device("cpu"))
    assert splits * 32 >= 2 * tc.sm_count(torch.device("cpu")) and splits * per >= 32
    assert tc.split_count(cfg, 10 ** 6, 32, torch.device("cpu")) == (1, 32)


def test_auto_never_picks_the_interpreter_without_gpu():
    if HAS_GPU:
        pytest.skip("GPU machine: auto may pick triton")
    qw = make_weight(32, 64, 4, 32, "symmetric", False, torch.float16, 0, "cpu")
    x = torch.randn(2, 64).half()
    assert "selected: reference" in dqgemm.explain(x, qw)


def test_bf16_on_cpu_is_refused_with_reason():
    problem = registry.Problem(m=1, n=8, k=64, bits=4, group_size=32, dtype=torch.bfloat16,
                               scale_dtype=torch.float16, zero_mode="symmetric",
                               act_order=False, device_type="cpu")
    reason = tc.KERNEL.supports(problem)
    assert reason is not None and ("bfloat16" in reason or "interpreter" in reason)


def _has_nvidia_backend():
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except Exception:
        return False


@needs_triton
@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend here")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Every family compiled for sm_90 by Triton's own ptxas, no GPU needed: GPU-only
    compile errors and shared-memory overflows surface in CI (bench/triton_aot_check.py)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "triton_aot_check.py"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, str(script), "--quick"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "0 failed" in res.stdout


# ----------------------------------------------------------------------------------------
# CPU: the kernels in Triton's interpreter (fp16, shapes <= 256).
# ----------------------------------------------------------------------------------------

CPU_FAMILIES = ("gemv", "shiftless", "splitk", "planes", "gemm", "gemm_lhs", "dequant")


def _cpu_cases():
    """(family, bits, group_size, mode, act_order, m, n, k, split_k, bias) covering every
    value of each factor, with the families' step sizes both inside one group and not."""
    modes = ("symmetric", "zero_points", "offsets")
    group_sizes = (32, 64, 128, 256, -1)
    ms = {"splitk": (3, 16, 17, 5, 2), "planes": (2, 17, 16, 3, 33),
          "gemm": (64, 129, 17, 70, 33), "gemm_lhs": (70, 33, 64, 129, 17),
          "dequant": (5, 129, 64, 1, 20)}
    cases = []
    i = 0
    for family, bits in itertools.product(CPU_FAMILIES, (4, 8)):
        for gs in group_sizes:
            mode = modes[i % 3]
            act = i % 4 == 1 and gs != -1
            k = 256 if gs in (128, 256) else (192 if gs == 64 else (160 if gs == 32 else 200))
            n = (96, 200, 64, 136, 256)[i % 5]
            m = 1 if family in ("gemv", "shiftless") else ms[family][i % 5]
            split = 1 + i % 3
            cases.append((family, bits, gs, mode, act, m, n, k, split, i % 2 == 0))
            i += 1
    return cases


def _cpu_config(family, bits, split):
    e = 32 // bits
    if family == "gemv":
        return tc.TritonConfig("gemv", block_m=1, block_n=64, block_k=16 * e, split_k=split)
    if family == "shiftless":   # with the other register-saving gemv options
        return tc.TritonConfig("gemv", block_m=1, block_n=64, block_k=16 * e, split_k=split,
                               shiftless=True, row_reduce=True, prefetch=False)
    if family == "splitk":
        return tc.TritonConfig("splitk", block_m=16, block_n=64, block_k=128, split_k=split)
    if family == "planes":
        return tc.TritonConfig("splitk", block_m=16, block_n=64, block_k=16 * e,
                               split_k=split, planes=True)
    if family == "dequant":
        return tc.TritonConfig("dequant", block_m=1, block_n=64, block_k=8 * e)
    if family == "gemm_lhs":   # the weight as the dot's LHS (out^T = W x^T)
        return tc.TritonConfig("gemm", block_m=32, block_n=64, block_k=64, w_lhs=True)
    return tc.TritonConfig("gemm", block_m=32, block_n=64, block_k=64)


@needs_triton
@needs_cpu_interpreter
@pytest.mark.parametrize("family,bits,gs,mode,act,m,n,k,split,with_bias", _cpu_cases())
def test_interpreter_sweep(family, bits, gs, mode, act, m, n, k, split, with_bias):
    seed = seed_of(family, bits, gs, mode, m, n, k)
    qw = make_weight(n, k, bits, gs, mode, act, torch.float16, seed, "cpu")
    x = activations(m, k, torch.float16, seed, "cpu")
    bias = torch.randn(n).half() if with_bias else None
    out = run_forced(x, qw, _cpu_config(family, bits, split), bias)
    assert rel_error(out, x, qw, bias) <= TOL[torch.float16]


@needs_triton
@needs_cpu_interpreter
@pytest.mark.parametrize("family,bits,k,n,m", [("gemv", 4, 77, 33, 1), ("splitk", 4, 77, 1, 3),
                                               ("dequant", 8, 99, 17, 2), ("gemm", 4, 33, 5, 4),
                                               ("gemm_lhs", 4, 33, 5, 4)])
def test_interpreter_odd_shapes(family, bits, k, n, m):
    """K not a multiple of the codes per word (padding codes must add nothing), N = 1."""
    qw = make_weight(n, k, bits, -1, "zero_points", False, torch.float16, k + n, "cpu")
    x = activations(m, k, torch.float16, k, "cpu")
    out = run_forced(x, qw, _cpu_config("splitk" if family == "splitk" else family, bits, 2))
    assert rel_error(out, x, qw) <= 2e-3


def _nan_guarded(t):
    """The same values, followed in memory by NaN rows: a kernel reading past the last
    group (the interpreter does no bounds checks) then produces NaN."""
    buf = torch.full((t.shape[0] + 8,) + tuple(t.shape[1:]), float("nan"), dtype=t.dtype,
                     device=t.device)
    buf[:t.shape[0]] = t
    return buf[:t.shape[0]]


@needs_triton
@pytest.mark.skipif(not (HAS_GPU or (INTERPRET and tc.INTERPRET_AT_IMPORT)),
                    reason="needs a GPU or the CPU interpreter")
@pytest.mark.parametrize("family,bits,gs,mode", [
    ("gemv", 8, -1, "symmetric"), ("gemv", 4, 128, "zero_points"),
    ("splitk", 8, -1, "offsets"), ("splitk", 4, 128, "symmetric"),
    ("planes", 4, -1, "zero_points")])
def test_no_reads_past_the_last_group(family, bits, gs, mode):
    """K steps that do not divide evenly into splits (7 steps, 3 splits): the last split
    must not read scales / zero points of a group past the end (regression: NaN on H100)."""
    device = "cuda" if HAS_GPU else "cpu"
    e = 32 // bits
    k, n, m = 7 * 16 * e, 64, (1 if family == "gemv" else 5)
    qw = make_weight(n, k, bits, gs, mode, False, torch.float16, 11, device)
    prepared = tc.prepare_weight(qw)
    prepared.scales = _nan_guarded(prepared.scales)
    for name in ("zero_points", "offsets"):
        if getattr(prepared, name) is not None:
            setattr(prepared, name, _nan_guarded(getattr(prepared, name)))
    args = tc.launch_args(prepared, registry.WeightSpec(bits, gs, k, n))
    cfg = {"gemv": tc.TritonConfig("gemv", block_m=1, block_n=64, block_k=16 * e, split_k=3),
           "splitk": tc.TritonConfig("splitk", block_m=16, block_n=64, block_k=16 * e,
                                     split_k=3),
           "planes": tc.TritonConfig("splitk", block_m=16, block_n=64, block_k=16 * e,
                                     split_k=3, planes=True)}[family]
    assert tc.split_count(cfg, 1, 7, torch.device(device)) == (3, 3)
    x = activations(m, k, torch.float16, 11, device)
    poison_workspaces()
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=device)
    tc.run_with_config(x, args, None, cfg, out)
    assert rel_error(out, x, qw) <= 2e-3


@needs_triton
@needs_cpu_interpreter
@pytest.mark.parametrize("m", [1, 3, 129])
def test_interpreter_public_matmul(m):
    """dqgemm.matmul(backend='triton'): dispatch, prepared cache, bias cast, leading dims."""
    qw = make_weight(80, 128, 4, 64, "zero_points", m == 3, torch.float32, m, "cpu")
    x = activations(m * 2, 128, torch.float16, m, "cpu").reshape(2, m, 128)
    bias = torch.randn(80)  # fp32 bias with fp16 activations
    out = dqgemm.matmul(x, qw, bias, backend="triton")
    assert out.shape == (2, m, 80) and out.dtype == torch.float16
    assert rel_error(out.reshape(-1, 80), x.reshape(-1, 128), qw, bias) <= 2e-3


# ----------------------------------------------------------------------------------------
# GPU: the full sweep.
# ----------------------------------------------------------------------------------------

GPU_MS = (1, 3, 16, 17, 64, 129, 1024)
GPU_SHAPES = ((576, 6144), (1536, 576), (11008, 576), (4096, 6144), (256, 576))


def _gpu_cases():
    """Every (shape, M) pair, each with 3 combinations of (group size, dtype, bits, zero
    mode, act-order), rotating so that every value of every factor meets every shape and
    several M (the full cartesian product would compile hundreds of kernel variants)."""
    modes = ("symmetric", "zero_points", "offsets")
    group_sizes = (32, 64, 128, 256, -1)
    cases = []
    i = 0
    for (k, n), m in itertools.product(GPU_SHAPES, GPU_MS):
        for j in range(3):
            gs = group_sizes[(i + 2 * j) % 5]
            if gs != -1 and k % gs:
                gs = -1 if j % 2 else 64
            dtype = (torch.float16, torch.bfloat16)[(i + j) % 2]
            bits = (4, 8)[(i // 2 + j) % 2]
            cases.append((m, n, k, bits, gs, modes[(i + j) % 3], (i + j) % 5 == 2 and gs != -1,
                          dtype))
        i += 1
    return cases


@needs_triton
@needs_gpu
@pytest.mark.parametrize("m,n,k,bits,gs,mode,act,dtype", _gpu_cases())
def test_gpu_sweep_public_matmul(m, n, k, bits, gs, mode, act, dtype):
    seed = seed_of(m, n, k, bits, gs, mode, act)
    scale_dtype = (torch.float32 if seed % 4 == 0 else dtype)
    qw = make_weight(n, k, bits, gs, mode, act, scale_dtype, seed, "cuda")
    x = activations(m, k, dtype, seed, "cuda")
    bias = torch.randn(n, device="cuda").to(dtype) if seed % 3 == 0 else None
    poison_workspaces()
    out = dqgemm.matmul(x, qw, bias, backend="triton")
    assert rel_error(out, x, qw, bias) <= TOL[dtype]


def _gpu_forced_cases():
    cases = []
    for family, m in (("gemv", 1), ("shiftless", 1), ("splitk", 3), ("splitk", 17), ("splitk", 129),
                      ("planes", 16), ("gemm", 64), ("gemm", 129), ("dequant", 3),
                      ("dequant", 129)):
        for bits, gs, mode in ((4, 32, "zero_points"), (8, -1, "symmetric"),
                               (4, 128, "offsets"), (8, 64, "zero_points")):
            cases.append((family, m, bits, gs, mode))
    return cases


def _gpu_config(family, bits, m):
    e = 32 // bits
    bm = 16 if m <= 16 else 64 if m <= 64 else 128
    if family in ("gemv", "shiftless"):
        lean = family == "shiftless"
        return tc.TritonConfig("gemv", block_m=1, block_n=64, block_k=64 * e, shiftless=lean,
                               row_reduce=lean, prefetch=not lean)
    if family == "splitk":
        return tc.TritonConfig("splitk", block_m=bm, block_n=128, block_k=128,
                               num_warps=8 if bm == 128 else 4)
    if family == "planes":
        return tc.TritonConfig("splitk", block_m=bm, block_n=128, block_k=16 * e, planes=True)
    if family == "dequant":
        return tc.TritonConfig("dequant", block_m=1, block_n=128, block_k=16 * e)
    return tc.TritonConfig("gemm", block_m=bm, block_n=128, block_k=64, num_warps=8)


@needs_triton
@needs_gpu
@pytest.mark.parametrize("family,m,bits,gs,mode", _gpu_forced_cases())
def test_gpu_each_family_forced(family, m, bits, gs, mode):
    k, n = 1536, 576
    seed = seed_of(family, m, bits, gs, mode)
    dtype = (torch.float16, torch.bfloat16)[seed % 2]
    qw = make_weight(n, k, bits, gs, mode, seed % 3 == 0, dtype, seed, "cuda")
    x = activations(m, k, dtype, seed, "cuda")
    bias = torch.randn(n, device="cuda").to(dtype) if seed % 3 else None
    out = run_forced(x, qw, _gpu_config(family, bits, m), bias)
    assert rel_error(out, x, qw, bias) <= TOL[dtype]


@needs_triton
@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gpu_cuda_graph_capture(m):
    qw = make_weight(4096, 1024, 4, 128, "symmetric", False, torch.float16, m, "cuda")
    x = activations(m, 1024, torch.float16, m, "cuda")
    dqgemm.matmul(x, qw, backend="triton")       # warm-up: compile + prepared layout
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dqgemm.matmul(x, qw, backend="triton")
    x.copy_(activations(m, 1024, torch.float16, m + 7, "cuda"))   # new data, same buffer
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(out, x, qw) <= 2e-3


@needs_triton
@needs_gpu
def test_gpu_torch_compile_fullgraph():
    qw = make_weight(512, 1024, 4, 64, "zero_points", False, torch.bfloat16, 5, "cuda")
    x = activations(16, 1024, torch.bfloat16, 5, "cuda")

    @torch.compile(fullgraph=True)
    def f(a):
        return dqgemm.matmul(a, qw, backend="triton") * 2

    out = f(x)
    assert rel_error(out / 2, x, qw) <= 1e-2


@needs_triton
@needs_gpu
def test_gpu_quantlinear_uses_triton():
    lin = torch.nn.Linear(1024, 768, bias=True).half().cuda()
    q = dqgemm.QuantLinear.from_linear(lin, bits=4, group_size=128, backend="triton")
    x = torch.randn(5, 1024, device="cuda").half()
    out = q(x)
    assert rel_error(out, x, q.quantized_weight(), q.bias) <= 2e-3
