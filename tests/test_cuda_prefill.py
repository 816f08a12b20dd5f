"""cuda_prefill: the launch choice and argument checks (CPU, run in CI) and the Hopper
kernel (GPU with compute capability 9.0 and an sm_90a build only).

GPU tests compare against a float64 product of the dequantized weight on fresh random data,
poison the output buffer before each launch, cover every token tile and k split, odd M, N
and K, and check bitwise determinism and CUDA-graph replay. They skip cleanly elsewhere.
"""

import pytest
import torch

import dqgemm
from _util import TOLERANCE as TOL
from _util import capture_graph, make_quantized
from dqgemm import ops, registry
from dqgemm.kernels import cuda_decode as cd
from dqgemm.kernels import cuda_prefill as cp


# ----------------------------------------------------------------------------------------
# CPU.
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 64, 65, 256, 1000, 4096])
@pytest.mark.parametrize("n,k", [(4096, 4096), (28672, 8192), (8192, 28672), (576, 11008)])
def test_choice_is_valid_and_fills_the_machine(m, n, k):
    choice = cp.choose_tile(m, n, k, 132)
    assert choice.m_tile in cp.M_TILES
    k_stages = cd.padded_sizes(n, k)[1] // cp.STAGE_K
    assert 1 <= choice.k_splits <= min(k_stages, 4)
    assert choice.valid()


@pytest.mark.parametrize("m", [1, 64, 300, 4096])
def test_model_choice_is_cheapest(m, monkeypatch):
    monkeypatch.setitem(cp._config(), "measured", [])
    cp.choose_tile.cache_clear()
    try:
        choice = cp.choose_tile(m, 4096, 14336, 132)
        model = cp._config()["cost_model"]
        for other in cp.all_choices(4, stream_k="stream_k_penalty" in model):
            assert (cp.estimate_cost(m, 4096, 14336, choice, 132)
                    <= cp.estimate_cost(m, 4096, 14336, other, 132))
    finally:
        cp.choose_tile.cache_clear()


def test_measured_table_wins_near_its_m(monkeypatch):
    entry = {"k": 4096, "n": 4096, "bits": 4, "m": 1024, "m_tile": 64, "n_tile": 256,
             "k_splits": 3}
    monkeypatch.setitem(cp._config(), "measured", [entry])
    cp.choose_tile.cache_clear()
    try:
        assert cp.choose_tile(1024, 4096, 4096, 132, 4) == cp.TileChoice(64, 3, 256)
        assert cp.choose_tile(1500, 4096, 4096, 132, 4) == cp.TileChoice(64, 3, 256)
        # far from the measured M, or another width: the model decides
        assert cp.choose_tile(64, 4096, 4096, 132, 4) == cp.choose_tile(64, 4096, 4096, 132, 8)
    finally:
        cp.choose_tile.cache_clear()


def test_model_splits_k_when_tiles_are_few(monkeypatch):
    monkeypatch.setitem(cp._config(), "measured", [])
    cp.choose_tile.cache_clear()
    try:
        # 14336 x 4096 at M = 256: 32 n_tiles x 1-2 m tiles cannot fill 132 SMs unsplit
        assert cp.choose_tile(256, 4096, 14336, 132).k_splits > 1
        # a wide layer at large M has tiles for several waves: no split
        assert cp.choose_tile(4096, 28672, 8192, 132).k_splits == 1
    finally:
        cp.choose_tile.cache_clear()


def test_shipped_table_is_valid_and_sourced():
    """Every measured entry names a configuration the kernel has and a results file that
    is in the repository, and the cost model knows every configuration."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    entries = cp._config()["measured"]
    assert entries, "the shipped table is empty"
    for e in entries:
        choice = cp.TileChoice(e["m_tile"], e["k_splits"], e["n_tile"], e["warp_specialized"],
                               e.get("stream_k", False))
        assert choice.valid(), e
        assert choice.k_splits <= cd.padded_sizes(e["n"], e["k"])[1] // cp.STAGE_K, e
        path = e["source"].split(" ")[0]
        assert os.path.isfile(os.path.join(root, path)), path
        assert e["us"] > 0 and e["fp16_us"] > 0
    model = cp._config()["cost_model"]
    for choice in cp.all_choices(1):
        assert choice.key in model["blocks_per_sm"] and choice.key in model["relative_cost"]


def test_stream_k_choices_and_cost():
    sk = [c for c in cp.all_choices(2) if c.stream_k]
    # one stream-K variant per warp-specialized tile, all with one k split
    assert sorted(c.key for c in sk) == sorted(c.key for c in cp.all_choices(1, stream_k=False)
                                              if c.warp_specialized and c.key != "128x256ws")
    assert all(c.k_splits == 1 and c.valid() and c.label.endswith("/sk") for c in sk)
    assert not cp.TileChoice(128, 1, 128, False, stream_k=True).valid()
    assert not cp.TileChoice(128, 2, 128, True, stream_k=True).valid()
    assert not cp.TileChoice(128, 1, 256, True, stream_k=True).valid()
    assert cp.TileChoice(128, 2, 128, True).label == "128x128ws/2"
    assert not any(c.stream_k for c in cp.all_choices(2, stream_k=False))
    # grid: one block per SM, never more blocks than (tile, k stage) units
    choice = cp.TileChoice(256, 1, 128, True, stream_k=True)
    assert cp.stream_k_grid(256, 10240, 8192, choice, 132) == 132
    assert cp.stream_k_grid(1, 128, 128, choice, 132) == 2   # 1 tile x 2 k stages


def test_stream_k_cost_has_no_wave_quantization(monkeypatch):
    """80 tiles on 132 SMs: the waves model charges a whole wave, stream-K 80/132 of one
    (plus its penalty)."""
    monkeypatch.setitem(cp._config()["cost_model"], "stream_k_penalty", 0.1)
    dp = cp.TileChoice(256, 1, 128, True)
    sk = cp.TileChoice(256, 1, 128, True, stream_k=True)
    ratio = (cp.estimate_cost(256, 10240, 8192, sk, 132)
             / cp.estimate_cost(256, 10240, 8192, dp, 132))
    assert ratio == pytest.approx(1.1 * 80 / 132, rel=0.02)


def _problem(**kw):
    base = dict(m=256, n=4096, k=4096, bits=4, group_size=128, dtype=torch.float16,
                scale_dtype=torch.float16, zero_mode="symmetric", act_order=False,
                device_type="cuda", device_name="NVIDIA H100 80GB HBM3", arch=(9, 0))
    base.update(kw)
    return registry.Problem(**base)


def test_supports_reasons():
    kernel = registry.get_kernel("cuda_prefill")
    assert kernel.supports(_problem()) is None
    assert "9.0" in kernel.supports(_problem(arch=(8, 0)))
    assert "9.0" in kernel.supports(_problem(arch=(10, 0)))
    assert "CUDA" in kernel.supports(_problem(device_type="cpu"))
    assert "K % 8" in kernel.supports(_problem(k=4100))
    assert "fp16/bf16" in kernel.supports(_problem(dtype=torch.float32))
    assert "bits" not in (kernel.supports(_problem(bits=8)) or "")


def test_shares_the_decode_layout_cache():
    assert registry.get_kernel("cuda_prefill").prepared_key == "cuda_decode"
    assert registry.get_kernel("cuda_decode").prepared_key is None


def test_prepared_cache_key_is_shared(monkeypatch):
    """Two kernels naming one prepared_key build the layout once per weight."""
    calls = []

    class Fake(registry.Kernel):
        backend = "reference"

        def __init__(self, name, key):
            self.name, self.prepared_key = name, key

        def prepare(self, qweight):
            calls.append(self.name)
            return registry.PreparedWeight(qweight.qdata, qweight.scales)

    qw = dqgemm.quantize(torch.randn(64, 128), 4, 64)
    args = (qw.qdata, qw.scales, qw.zero_points, qw.offsets, qw.g_idx, 4, 64, 128)
    first = ops.prepared_for(Fake("fake_a", "shared_key"), *args)
    second = ops.prepared_for(Fake("fake_b", "shared_key"), *args)
    assert first is second and calls == ["fake_a"]


# ----------------------------------------------------------------------------------------
# GPU.
# ----------------------------------------------------------------------------------------

def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    reason = registry.get_kernel("cuda_prefill").available()
    if reason is not None:
        return reason
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs compute capability 9.0, got {torch.cuda.get_device_capability()}"
    return None


gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=f"needs a Hopper GPU: {_gpu_reason()}")


def _make(n, k, bits, group_size, mode="symmetric", seed=0, act_order=False):
    return make_quantized(n, k, bits, group_size, mode, seed, act_order)


def _check(qw, m, dtype, bias=False, seed=1, repeats=1, x=None, m_tile=None, k_splits=None,
           n_tile=128, ws=False, prep=None, stream_k=False, stream_k_blocks=None):
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(m, qw.in_features, generator=gen).to(dtype).cuda()
    b = (torch.randn(qw.out_features, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    prep = prep or cd.prepare_decode(qw)
    outs = []
    for _ in range(repeats):
        out = torch.full((m, qw.out_features), float("nan"), dtype=dtype, device="cuda")
        cp.prefill_matmul(x, prep, b, m_tile=m_tile, k_splits=k_splits, n_tile=n_tile,
                          warp_specialized=ws, stream_k=stream_k,
                          stream_k_blocks=stream_k_blocks, out=out)
        outs.append(out)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    if b is not None:
        ref = ref + b.double()
    out = outs[0]
    assert torch.isfinite(out).all(), "output holds NaN/Inf (unwritten or overflow)"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[dtype], (f"M={m} N={qw.out_features} K={qw.in_features} "
                               f"m_tile={m_tile} n_tile={n_tile} k_splits={k_splits} "
                               f"stream_k={stream_k}/{stream_k_blocks}: "
                               f"{err:.3e}")
    for other in outs[1:]:
        assert torch.equal(other, out), "results differ between runs"
    return out


SHAPES = [(576, 576), (1536, 576), (576, 1536), (6144, 1536), (11008, 576), (576, 11008),
          (13824, 576), (1536, 6144)]


@gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", SHAPES)
def test_shapes(n, k, bits):
    qw = _make(n, k, bits, 64, seed=n + k)
    prep = cd.prepare_decode(qw)
    for m in (1, 3, 16, 17, 64, 129, 257, 1000):
        _check(qw, m, torch.float16, seed=m, prep=prep)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["symmetric", "zero_points", "offsets"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_groups_modes_dtypes(bits, group_size, mode, dtype):
    qw = _make(640, 1536, bits, group_size, mode, seed=group_size + 5)
    prep = cd.prepare_decode(qw)
    for m in (1, 129, 300):
        _check(qw, m, dtype, bias=m == 129, seed=m, prep=prep)


@gpu
@pytest.mark.parametrize("m_tile,n_tile,ws", [(64, 128, False), (128, 128, False),
                                              (256, 128, False), (64, 256, False),
                                              (128, 256, False), (64, 128, True),
                                              (64, 256, True), (128, 128, True),
                                              (256, 128, True), (128, 256, True)])
@pytest.mark.parametrize("k_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("bits,dtype", [(4, torch.float16), (8, torch.bfloat16),
                                        (4, torch.bfloat16), (8, torch.float16)])
def test_every_tile_and_split(m_tile, n_tile, ws, k_splits, bits, dtype):
    # N = 384: three n_tiles, so 256-channel blocks end on a half-empty block (N % 8 == 0:
    # the epilogue staged through shared memory; test_direct_epilogue covers N % 8 != 0)
    qw = _make(384, 2304, bits, 128, "zero_points", seed=m_tile + k_splits)
    prep = cd.prepare_decode(qw)
    for m in (1, m_tile - 1, m_tile + 3, 2 * m_tile + 1):
        _check(qw, m, dtype, seed=m, m_tile=m_tile, k_splits=k_splits, n_tile=n_tile, ws=ws,
               repeats=2, prep=prep, bias=m == 1)


@gpu
@pytest.mark.parametrize("m_tile,n_tile", [(64, 128), (64, 256), (128, 128), (256, 128)])
@pytest.mark.parametrize("bits,dtype", [(4, torch.float16), (8, torch.bfloat16),
                                        (4, torch.bfloat16), (8, torch.float16)])
def test_stream_k(m_tile, n_tile, bits, dtype):
    """Stream-K with block counts that make blocks start and end inside tiles and span
    several (3, 7, 11, one per SM, one per unit), odd M; repeated runs bitwise equal."""
    # N = 384: three n_tiles (a half-empty last block column at n_tile 256); K = 2304:
    # 36 k stages
    qw = _make(384, 2304, bits, 64, "zero_points", seed=m_tile + n_tile + bits)
    prep = cd.prepare_decode(qw)
    for m in (1, m_tile + 3, 2 * m_tile + 1):
        tiles = -(-384 // n_tile) * -(-m // m_tile)
        for blocks in (3, 7, 11, None, tiles * 36):
            _check(qw, m, dtype, seed=m, m_tile=m_tile, k_splits=1, n_tile=n_tile, ws=True,
                   stream_k=True, stream_k_blocks=blocks, repeats=2, prep=prep,
                   bias=m == 1)


@gpu
@pytest.mark.parametrize("mode", ["symmetric", "offsets"])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_stream_k_groups_modes_and_direct_epilogue(bits, group_size, mode):
    qw = _make(203, 1536, bits, group_size, mode, seed=group_size + 23)  # N % 8 != 0
    prep = cd.prepare_decode(qw)
    for dtype in (torch.float16, torch.bfloat16):
        for m in (3, 300):
            _check(qw, m, dtype, seed=m, m_tile=64, k_splits=1, n_tile=256, ws=True,
                   stream_k=True, stream_k_blocks=5, prep=prep, bias=True)
            _check(qw, m, dtype, seed=m, m_tile=256, k_splits=1, ws=True, stream_k=True,
                   prep=prep)


@gpu
@pytest.mark.parametrize("mode", ["symmetric", "offsets"])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_wide_tiles_groups_modes(bits, group_size, mode):
    qw = _make(640, 1536, bits, group_size, mode, seed=group_size + 17)
    prep = cd.prepare_decode(qw)
    for dtype in (torch.float16, torch.bfloat16):
        for m in (3, 200):
            for ws in (False, True):
                _check(qw, m, dtype, seed=m, m_tile=128, k_splits=2, n_tile=256, ws=ws,
                       prep=prep)
            _check(qw, m, dtype, seed=m, m_tile=256, k_splits=1, ws=True, prep=prep)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (8, -1)])
def test_activations_of_one_sign(bits, group_size, dtype):
    qw = _make(384, 8192, bits, group_size, "zero_points", seed=7)
    for m in (5, 200):
        gen = torch.Generator().manual_seed(m)
        x = torch.randn(m, 8192, generator=gen).abs() + 1.0
        x[:, 100] = 60.0
        _check(qw, m, dtype, x=x.to(dtype).cuda())


@gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_and_fractional_zero(bits):
    _check(_make(576, 1536, bits, 128, act_order=True, seed=4), 300, torch.float16)
    _check(_make(576, 1536, bits, 64, "zero_points", act_order=True, seed=5), 257,
           torch.bfloat16)
    _check(_make(576, 1536, bits, 32, "fractional_zero", seed=6), 130, torch.float16)


@gpu
@pytest.mark.parametrize("m_tile,n_tile,ws", [(128, 256, True), (256, 128, False),
                                              (64, 128, True)])
def test_direct_epilogue(m_tile, n_tile, ws):
    """N % 8 != 0 (and an output view starting off a 16-byte boundary): the element-wise
    epilogue instead of the staged one."""
    qw = _make(203, 1536, 4, 128, "zero_points", seed=13)
    prep = cd.prepare_decode(qw)
    _check(qw, 150, torch.float16, m_tile=m_tile, k_splits=2, n_tile=n_tile, ws=ws, prep=prep,
           bias=True)
    qw = _make(264, 1536, 8, -1, seed=14)
    prep = cd.prepare_decode(qw)
    x = torch.randn(150, 1536, device="cuda", dtype=torch.bfloat16)
    buf = torch.full((150 * 264 + 4,), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = buf[4:].view(150, 264)  # 8 bytes past an aligned start
    cp.prefill_matmul(x, prep, None, m_tile=m_tile, k_splits=1, n_tile=n_tile,
                      warp_specialized=ws, out=out)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[torch.bfloat16] and torch.isnan(buf[:4]).all()


@gpu
def test_large_layer():
    qw = _make(4096, 4096, 4, 128, seed=11)
    for m in (256, 1024):
        _check(qw, m, torch.float16, seed=m)


@gpu
def test_bitwise_deterministic_with_splits():
    qw = _make(576, 13824, 4, 128, seed=7)
    prep = cd.prepare_decode(qw)
    for k_splits in (1, 4):
        for ws in (False, True):
            _check(qw, 300, torch.float16, repeats=4, m_tile=128, k_splits=k_splits, ws=ws,
                   prep=prep)


@gpu
@pytest.mark.parametrize("launch", [dict(m_tile=128, k_splits=3),
                                    dict(m_tile=256, k_splits=1, warp_specialized=True,
                                         stream_k=True)])
def test_counters_left_at_zero_and_graph_replay(launch):
    qw = _make(1536, 6144, 4, 128, seed=9)
    prep = cd.prepare_decode(qw)
    x = torch.randn(200, 6144, device="cuda", dtype=torch.float16)
    eager = cp.prefill_matmul(x, prep, None, **launch)
    torch.cuda.synchronize()
    for _, counters in cd._WORKSPACES.values():
        assert int(counters.abs().sum()) == 0
    static_out = torch.empty_like(eager)
    graph = capture_graph(lambda: cp.prefill_matmul(x, prep, None, out=static_out, **launch))
    for _ in range(3):
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)


@gpu
def test_tile_override_checked():
    qw = _make(256, 512, 4, 128, seed=12)
    prep = cd.prepare_decode(qw)
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="m_tile"):
        cp.prefill_matmul(x, prep, None, m_tile=96, k_splits=1)
    with pytest.raises(ValueError, match="k_splits"):
        cp.prefill_matmul(x, prep, None, m_tile=64, k_splits=9)
    with pytest.raises(ValueError, match="both or neither"):
        cp.prefill_matmul(x, prep, None, m_tile=64)
    with pytest.raises(ValueError, match="n_tile"):
        cp.prefill_matmul(x, prep, None, m_tile=256, k_splits=1, n_tile=256)
    with pytest.raises(ValueError, match="stream_k: needs warp_specialized"):
        cp.prefill_matmul(x, prep, None, m_tile=64, k_splits=2, warp_specialized=True,
                          stream_k=True)
    with pytest.raises(ValueError, match="stream_k: needs warp_specialized"):
        cp.prefill_matmul(x, prep, None, m_tile=64, k_splits=1, stream_k=True)
    # 2 n_tiles x 1 m tile x 8 k stages = 16 units
    with pytest.raises(ValueError, match=r"stream_k_blocks: expected an int in 1\.\.16"):
        cp.prefill_matmul(x, prep, None, m_tile=64, k_splits=1, warp_specialized=True,
                          stream_k=True, stream_k_blocks=17)
    with pytest.raises(ValueError, match="stream_k_blocks"):
        cp.prefill_matmul(x, prep, None, m_tile=64, k_splits=1, stream_k_blocks=4)
    with pytest.raises(ValueError, match="stream_k: not available with m_tile=128, n_tile=256"):
        cp.prefill_matmul(x, prep, None, m_tile=128, k_splits=1, n_tile=256,
                          warp_specialized=True, stream_k=True)


@gpu
def test_public_matmul_reaches_cuda_prefill():
    qw = _make(576, 1536, 4, 128, seed=10)
    x = torch.randn(2, 150, 1536, device="cuda", dtype=torch.bfloat16)
    kernel = registry.get_kernel("cuda_prefill")
    out = kernel.run(x.reshape(-1, 1536), ops.prepared_for(
        kernel, qw.qdata, qw.scales, qw.zero_points, qw.offsets, qw.g_idx, 4, 128, 1536),
        None, None)
    ref = x.reshape(-1, 1536).double() @ qw.dequantize(torch.float64).t()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[torch.bfloat16]
