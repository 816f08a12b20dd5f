"""cuda_decode: the pure-PyTorch re-layout (CPU, runs in CI) and the CUDA kernel (GPU only).

GPU tests compare against a float64 product of the dequantized weight on fresh random data,
poison the output buffer before each launch, and check bitwise determinism and CUDA-graph
replay. They skip cleanly when no GPU or no built extension is present.
"""

import pytest
import torch

import dqgemm
from _util import capture_graph, make_quantized
from dqgemm import _ext, registry
from dqgemm.kernels import cuda_decode as cd

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------------------
# CPU: layouts.
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", [(128, 128), (200, 576), (256, 1536), (130, 8), (1, 136)])
def test_pack_unpack_round_trip(bits, n, k):
    gen = torch.Generator().manual_seed(n * 7 + k)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    packed = cd.pack_decode_weight(codes, bits)
    n_pad, k_pad = cd.padded_sizes(n, k)
    assert packed.dtype == torch.uint8 and packed.numel() == n_pad * k_pad * bits // 8
    assert torch.equal(cd.unpack_decode_weight(packed, bits, n, k), codes)


def _lane_words(packed, bits, k_pad, tile, kblock, slice16, lane):
    """The 16 bytes lane `lane` loads for (n_tile, k block, 16-row slice), as 4 words."""
    span = 64 if bits == 4 else 32
    chunk = ((tile * (k_pad // span) + kblock) * 8 + slice16) * 32 + lane
    b = packed.view(-1, 16)[chunk].tolist()
    return [b[4 * w] | b[4 * w + 1] << 8 | b[4 * w + 2] << 16 | b[4 * w + 3] << 24
            for w in range(4)]


@pytest.mark.parametrize("bits", [4, 8])
def test_layout_matches_mma_fragment_order(bits):
    """Independent decoder written from the mma.m16n8k16 A-fragment definition: lane l owns
    rows r = l/4 and r+8, columns c = 2(l%4), c+1, c+8, c+9 of each 16x16 tile."""
    n, k = 256, 256
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    packed = cd.pack_decode_weight(codes, bits)
    span = 64 if bits == 4 else 32
    for tile, kblock, slice16, lane in [(0, 0, 0, 0), (0, 1, 3, 5), (1, 2, 7, 31),
                                        (1, 3, 5, 18)]:
        words = _lane_words(packed, bits, k, tile, kblock, slice16, lane)
        r, c = lane // 4, 2 * (lane % 4)
        row0 = tile * 128 + slice16 * 16 + r
        for k16 in range(span // 16):
            k0 = kblock * span + k16 * 16 + c
            # registers a0..a3 of the fragment: (row, k) of their low and high halves
            want = [(row0, k0), (row0, k0 + 1), (row0 + 8, k0), (row0 + 8, k0 + 1),
                    (row0, k0 + 8), (row0, k0 + 9), (row0 + 8, k0 + 8), (row0 + 8, k0 + 9)]
            if bits == 4:
                w = words[k16]
                # lop3 with 0x000F000F / 0x00F000F0 on w and w >> 8 gives a0, a1, a2, a3
                got = {0: w & 0xF, 1: (w >> 16) & 0xF, 2: (w >> 4) & 0xF, 3: (w >> 20) & 0xF,
                       4: (w >> 8) & 0xF, 5: (w >> 24) & 0xF, 6: (w >> 12) & 0xF,
                       7: (w >> 28) & 0xF}
            else:
                w0, w1 = words[2 * k16], words[2 * k16 + 1]
                byte = lambda w, i: (w >> (8 * i)) & 0xFF  # noqa: E731
                # prmt selectors 0x4240 / 0x4341: bytes (0, 2) and (1, 3)
                got = {0: byte(w0, 0), 1: byte(w0, 2), 2: byte(w0, 1), 3: byte(w0, 3),
                       4: byte(w1, 0), 5: byte(w1, 2), 6: byte(w1, 1), 7: byte(w1, 3)}
            for i, (row, kk) in enumerate(want):
                assert got[i] == int(codes[row, kk]), (tile, kblock, slice16, lane, k16, i)


@pytest.mark.parametrize("group_size,k", [(32, 576), (64, 576), (128, 1536), (256, 1536),
                                          (-1, 576)])
def test_group_params_round_trip_and_lane_pairs(group_size, k):
    n = 200
    g = 1 if group_size == -1 else k // group_size
    values = torch.randn(n, g).half()
    packed = cd.pack_group_params(values, group_size, k, torch.float16)
    assert torch.equal(cd.unpack_group_params(packed, n, g, group_size, k), values)
    # one 32-bit load per lane: (row r, row r + 8) of slice a of group j
    gp = cd.groups_padded(k, group_size)
    tile, j, a, r = 1, g - 1, 3, 5
    lo, hi = packed.view(-1, 2)[((tile * gp + j) * 8 + a) * 8 + r].tolist()
    row = tile * 128 + a * 16 + r
    assert lo == values[row, j].item() and hi == values[row + 8, j].item()


def test_group_size_codes():
    assert [cd.group_size_log2(1024, g) for g in (32, 64, 128, 256)] == [5, 6, 7, 8]
    assert cd.group_size_log2(576, -1) == 30
    assert cd.groups_padded(576, 64) == 10 and cd.groups_padded(576, -1) == 1


def test_prepare_modes_and_act_order_on_cpu():
    w = torch.randn(130, 256) * 0.02
    qw = dqgemm.quantize(w, 4, 64, symmetric=False)
    prep = cd.prepare_decode(qw)
    assert prep.zero_mode == "zero_points" and prep.zero_points is not None
    # fractional zero points become offsets o = -z * s: same dequantized weight
    frac = qw.replace(zero_points=qw.zero_points.float() + 0.25)
    prep = cd.prepare_decode(frac)
    assert prep.zero_mode == "offsets"
    codes = cd.unpack_decode_weight(prep.packed, 4, 130, 256).float()
    s = prep.source_scales.repeat_interleave(64, 1)
    o = prep.source_zo.repeat_interleave(64, 1)
    torch.testing.assert_close(codes * s + o, frac.dequantize(), rtol=1e-5, atol=1e-6)
    # act order: sorted columns + the gather index
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    ao = qw.replace(g_idx=(torch.arange(256) // 64)[perm].to(torch.int32).contiguous())
    prep = cd.prepare_decode(ao)
    assert prep.act_index is not None and prep.act_index.dtype == torch.int64
    sorted_codes = cd.unpack_decode_weight(prep.packed, 4, 130, 256)
    assert torch.equal(sorted_codes, ao.codes()[:, prep.act_index])
    # after sorting, column k belongs to group k // 64, as the kernel assumes
    assert torch.equal(ao.group_index()[prep.act_index], torch.arange(256) // 64)


def test_zero_points_outside_the_code_range_become_offsets():
    w = torch.randn(128, 128) * 0.02
    qw = dqgemm.quantize(w, 4, 32, symmetric=False)
    # integer but >= 2^bits: not representable as the kernel's (q - z) path, still exact
    big = qw.replace(zero_points=torch.full_like(qw.zero_points.float(), 17.0))
    prep = cd.prepare_decode(big)
    assert prep.zero_mode == "offsets"
    torch.testing.assert_close(prep.source_zo, -17.0 * big.scales.float())
    ok = cd.prepare_decode(qw.replace(zero_points=qw.zero_points.float()))
    assert ok.zero_mode == "zero_points"
    # fp32 scales are packed in the activation dtype on first use of that dtype
    s32 = ok.params_for(torch.bfloat16)[0]
    assert s32.dtype == torch.bfloat16 and torch.bfloat16 in ok.variants


def test_supports_reasons():
    kernel = registry.get_kernel("cuda_decode")
    base = registry.Problem(m=1, n=4096, k=4096, bits=4, group_size=128, dtype=torch.float16,
                            scale_dtype=torch.float16, zero_mode="symmetric", act_order=False,
                            device_type="cuda", device_name="NVIDIA H100", arch=(9, 0))
    assert kernel.supports(base) is None
    import dataclasses
    assert "M = 1..64" in kernel.supports(dataclasses.replace(base, m=65))
    assert "K % 8" in kernel.supports(dataclasses.replace(base, k=4100))
    assert "fp16/bf16" in kernel.supports(dataclasses.replace(base, dtype=torch.float32))
    assert "CUDA" in kernel.supports(dataclasses.replace(base, device_type="cpu"))
    assert "8.0" in kernel.supports(dataclasses.replace(base, arch=(7, 5)))


def test_launch_table_covers_every_tile():
    table = cd.launch_table()
    for bits in ("int4", "int8"):
        assert sorted(int(t) for t in table[bits]) == [8, 16, 32, 64]
    assert sorted(int(t) for t in cd.max_splits_table()) == [8, 16, 32, 64]


def test_small_layer_rule_of_the_launch_table():
    rules = cd._config()["small_layers"]["int4"]
    for tile, rule in rules.items():
        m, limit, bps = int(tile), int(rule["max_units"]), int(rule["blocks_per_sm"])
        assert cd.table_blocks_per_sm(m, 4, limit) == bps
        assert cd.table_blocks_per_sm(m, 4, limit + 1) == cd.table_blocks_per_sm(m, 4)
        assert cd.table_blocks_per_sm(m, 4, limit + 1) != bps
    # no rule for 8-bit: the per-tile entry whatever the size
    assert cd.table_blocks_per_sm(1, 8, 1) == cd.table_blocks_per_sm(1, 8)
    # 4096 x 4096 at M = 1: 32 tiles x 16 stages of 256
    assert cd.work_units(1, 4096, 4096, 4) == 512


def test_grid_never_exceeds_units_or_split_cap(monkeypatch):
    monkeypatch.setattr(cd, "_sm_count", lambda device_index: 132)
    cd.grid_size.cache_clear()
    # 576 x 576 (K_pad 640): INT4 M <= 16 stages are 256 deep, so 5 tiles x 3 k-chunks (the
    # last one half full) = 15 units < 264 blocks; INT8 stages are 128 deep: 5 x 5 = 25
    assert cd.grid_size(1, 576, 576, 4, 0) == 15
    assert cd.grid_size(1, 576, 576, 8, 0) == 25
    assert cd.grid_size(32, 576, 576, 4, 0) == 25
    # M = 64 on 4096 x 4096: 32 tiles, at most 4 blocks per tile
    assert cd.grid_size(64, 4096, 4096, 4, 0) == 32 * int(cd.max_splits_table()["64"])
    assert cd.grid_size(1, 28672, 8192, 4, 0, blocks_per_sm=3) == 396
    cd.grid_size.cache_clear()  # results above used the fake SM count


# ----------------------------------------------------------------------------------------
# GPU.
# ----------------------------------------------------------------------------------------

def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    return registry.get_kernel("cuda_decode").available()


gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=f"needs a GPU: {_gpu_reason()}")


def _make(n, k, bits, group_size, mode="symmetric", seed=0, act_order=False):
    return make_quantized(n, k, bits, group_size, mode, seed, act_order)


def _check(qw, m, dtype, bias=False, seed=1, repeats=1, x=None, **launch):
    """x: fresh random [m, K] activations unless given; launch: decode_matmul overrides
    (blocks_per_sm, producer_warp)."""
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(m, qw.in_features, generator=gen).to(dtype).cuda()
    b = (torch.randn(qw.out_features, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    prep = cd.prepare_decode(qw)
    outs = []
    for _ in range(repeats):
        out = torch.full((m, qw.out_features), float("nan"), dtype=dtype, device="cuda")
        cd.decode_matmul(x, prep, b, out=out, **launch)
        outs.append(out)
    w = qw.dequantize(torch.float64)
    ref = x.double() @ w.t()
    if b is not None:
        ref = ref + b.double()
    out = outs[0]
    assert torch.isfinite(out).all(), "output holds NaN/Inf (unwritten or overflow)"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[dtype], f"M={m} N={qw.out_features} K={qw.in_features}: {err:.3e}"
    for other in outs[1:]:
        assert torch.equal(other, out), "results differ between runs"
    return out


SHAPES = [(576, 576), (1536, 576), (576, 1536), (6144, 1536), (11008, 576), (576, 11008),
          (13824, 576), (576, 13824), (1536, 6144)]


@gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", SHAPES)
def test_shapes(n, k, bits):
    qw = _make(n, k, bits, 64, seed=n + k)
    for m in (1, 7, 16, 33, 64):
        _check(qw, m, torch.float16, seed=m)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["symmetric", "zero_points", "offsets"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_groups_modes_dtypes(bits, group_size, mode, dtype):
    qw = _make(640, 1536, bits, group_size, mode, seed=group_size + 5)
    for m in (1, 12, 29, 64):
        _check(qw, m, dtype, bias=m == 12, seed=m)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["symmetric", "zero_points"])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (4, -1), (8, -1), (8, 128)])
def test_activations_of_one_sign(bits, group_size, mode, dtype):
    # Activations that do not average out (all positive here, with an outlier column):
    # the tensor cores accumulate with truncation, so any scheme that sums large biased
    # terms and cancels them later loses bits here (a variant that summed magic + q and
    # removed (magic + z) * sum(x) per group failed this with 3e-3 .. 1e-2).
    qw = _make(384, 8192, bits, group_size, mode, seed=7)
    for m in (1, 9, 16):
        gen = torch.Generator().manual_seed(m)
        x = torch.randn(m, 8192, generator=gen).abs() + 1.0
        x[:, 100] = 60.0
        _check(qw, m, dtype, x=x.to(dtype).cuda())


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_m(dtype):
    qw4 = _make(384, 1536, 4, 128, seed=2)
    qw8 = _make(384, 1536, 8, -1, seed=3)
    for m in range(1, 65):
        _check(qw4, m, dtype, seed=m)
        _check(qw8, m, dtype, seed=m + 100)


@gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_and_fractional_zero(bits):
    _check(_make(576, 1536, bits, 128, act_order=True, seed=4), 5, torch.float16)
    _check(_make(576, 1536, bits, 64, "zero_points", act_order=True, seed=5), 17,
           torch.bfloat16)
    _check(_make(576, 1536, bits, 32, "fractional_zero", seed=6), 3, torch.float16)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["symmetric", "zero_points", "offsets"])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (8, -1), (8, 64)])
def test_short_last_stage(bits, group_size, mode, dtype):
    """K = 640: 4-bit stages at M <= 16 are 256 deep, so every tile ends with a half stage
    (2.5 stages of 256); K = 1536 and 11008 have whole ones; M up to 16."""
    for n, k in ((576, 640), (1536, 1536), (200, 11008)):
        qw = _make(n, k, bits, group_size, mode, seed=n * 3 + k)
        for m in (1, 5, 16):
            _check(qw, m, dtype, seed=m, repeats=2)


@gpu
@pytest.mark.parametrize("m", [1, 5, 16, 40, 64])
def test_bitwise_deterministic(m):
    # long K, small N: many blocks share each 128-channel tile (stream-K fixup path)
    qw = _make(576, 13824, 4, 128, seed=7)
    _check(qw, m, torch.float16, repeats=4)
    qw = _make(1536, 11008, 8, -1, "zero_points", seed=8)
    _check(qw, m, torch.bfloat16, repeats=4)


def _producer_reason():
    if _gpu_reason() is not None:
        return _gpu_reason()
    if torch.cuda.get_device_capability() < (9, 0):
        return "the copying-warp configuration needs compute capability 9.0+"
    return None


producer_gpu = pytest.mark.skipif(_producer_reason() is not None,
                                  reason=f"needs an sm_90 GPU: {_producer_reason()}")


@gpu
@pytest.mark.parametrize("launch", [
    pytest.param({}, id="table"),
    pytest.param({"producer_warp": True}, marks=producer_gpu, id="producer_warp")])
def test_counters_left_at_zero_and_graph_replay(launch):
    qw = _make(1536, 6144, 4, 128, seed=9)
    prep = cd.prepare_decode(qw)
    x = torch.randn(3, 6144, device="cuda", dtype=torch.float16)
    eager = cd.decode_matmul(x, prep, None, **launch)
    torch.cuda.synchronize()
    for ws, counters in cd._WORKSPACES.values():
        assert int(counters.abs().sum()) == 0
    static_out = torch.empty_like(eager)
    graph = capture_graph(lambda: cd.decode_matmul(x, prep, None, out=static_out, **launch))
    for _ in range(3):
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)


@gpu
def test_public_matmul_dispatches_to_cuda_decode():
    qw = _make(576, 1536, 4, 128, seed=10)
    x = torch.randn(2, 3, 1536, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(576, device="cuda", dtype=torch.float32)
    out = dqgemm.matmul(x, qw, bias, backend="cuda")
    assert out.shape == (2, 3, 576) and out.dtype == torch.bfloat16
    ref = x.reshape(-1, 1536).double() @ qw.dequantize(torch.float64).t() + bias.double()
    err = ((out.reshape(-1, 576).double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[torch.bfloat16]
    assert "cuda_decode" in dqgemm.explain(x, qw, backend="cuda")


def test_import_without_gpu_does_not_touch_cuda():
    # the module imported at collection time; no extension call happened on import
    assert cd.CudaDecodeKernel.name == "cuda_decode"
    assert _ext.DTYPE_CODES[torch.float16] == 0


@gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("blocks_per_sm", [3, 4])
def test_shallow_rings(bits, blocks_per_sm):
    """blocks_per_sm = 3 launches the shallower ring (3 stages at M <= 8, 2 at M <= 16), and
    4 at M <= 8 the 2-stage ring."""
    qw = _make(1536, 1536, bits, 64, "zero_points", seed=11)
    prep = cd.prepare_decode(qw)
    w = qw.dequantize(torch.float64)
    for m in (1, 8, 16):
        x = torch.randn(m, 1536, generator=torch.Generator().manual_seed(m)).half().cuda()
        out = torch.full((m, 1536), float("nan"), dtype=torch.float16, device="cuda")
        cd.decode_matmul(x, prep, None, blocks_per_sm=blocks_per_sm, out=out)
        ref = x.double() @ w.t()
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err <= TOL[torch.float16], f"M={m}: {err:.3e}"


@producer_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["symmetric", "zero_points", "offsets"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_producer_warp_groups_modes_dtypes(bits, group_size, mode, dtype):
    """The copying-warp configuration (bulk copies) on every group size, mode and dtype:
    K = 576 (a half last stage whose activation rows end at K: zeros stored after it) or
    1280, and whole stages (1536), at both of its M <= 8 rings (3 blocks per SM: 3 stages;
    2: 4 stages) and at M <= 16; bitwise repeatable."""
    for n, k in ((640, 1536), (200, 576 if 576 % max(group_size, 1) == 0 else 1280)):
        qw = _make(n, k, bits, group_size, mode, seed=group_size + 9 + k)
        for m, bps in ((1, 3), (1, 2), (5, 3), (8, 1), (9, None), (16, None)):
            _check(qw, m, dtype, bias=m == 5, seed=m, repeats=2, producer_warp=True,
                   blocks_per_sm=bps)


@producer_gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", SHAPES)
def test_producer_warp_shapes(n, k, bits):
    qw = _make(n, k, bits, 64, seed=n + 2 * k)
    for m in (1, 3, 16):
        _check(qw, m, torch.float16, seed=m, producer_warp=True)


@producer_gpu
def test_producer_warp_act_order_and_one_sign():
    _check(_make(576, 1536, 4, 128, act_order=True, seed=4), 5, torch.float16,
           producer_warp=True)
    _check(_make(576, 1536, 8, -1, seed=5), 3, torch.bfloat16, repeats=2, producer_warp=True,
           programmatic_launch=True)
    qw = _make(384, 8192, 4, 32, "zero_points", seed=7)
    x = torch.randn(9, 8192, generator=torch.Generator().manual_seed(3)).abs() + 1.0
    x[:, 100] = 60.0
    _check(qw, 9, torch.bfloat16, x=x.to(torch.bfloat16).cuda(), producer_warp=True)


@producer_gpu
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("producer,policy", [(True, False), (False, False), (None, True)])
def test_programmatic_launch_chain_reads_the_previous_output(graph, producer, policy):
    """With programmatic dependent launch the next kernel starts before the previous one
    ends; its activation copies must still see the previous kernel's whole output. A chain
    y1 = x W1^T, y2 = y1 W2^T, y3 = y2 W3^T (each launched programmatically, eagerly and
    inside a CUDA graph), each checked against float64 on the activations it was given:
    with the copying warp, with the cp.async rings (every token tile, so M up to 64), and
    through dqgemm.programmatic_launch() with the table's configurations (whose first
    launch of each weight is a normal one)."""
    gen = torch.Generator().manual_seed(21)
    dims = [1536, 2048, 1536, 576]
    preps, ws = [], []
    for i in range(3):
        qw = _make(dims[i + 1], dims[i], 4 if i != 1 else 8, 128 if i != 1 else -1,
                   seed=30 + i)
        preps.append(cd.prepare_decode(qw))
        ws.append(qw.dequantize(torch.float64))
    launch = ({} if policy else {"producer_warp": producer, "programmatic_launch": True})
    for m in ((1, 7, 16) if producer else (1, 7, 16, 29, 64)):
        x = (torch.randn(m, dims[0], generator=gen) * 0.5).half().cuda()
        outs = [torch.full((m, d), float("nan"), dtype=torch.float16, device="cuda")
                for d in dims[1:]]

        def chain():
            with dqgemm.programmatic_launch(policy):
                cd.decode_matmul(x, preps[0], None, out=outs[0], **launch)
                cd.decode_matmul(outs[0], preps[1], None, out=outs[1], **launch)
                cd.decode_matmul(outs[1], preps[2], None, out=outs[2], **launch)
        if graph:
            g = capture_graph(chain)
            for o in outs:
                o.fill_(float("nan"))
            g.replay()
        else:
            chain()
        torch.cuda.synchronize()
        inputs = [x] + outs[:2]
        for i in range(3):
            ref = inputs[i].double() @ ws[i].t()
            err = ((outs[i].double() - ref).norm() / ref.norm()).item()
            assert torch.isfinite(outs[i]).all() and err <= TOL[torch.float16], (m, i, err)


def test_producer_warp_argument_checked():
    prep = cd.prepare_decode(dqgemm.quantize(torch.randn(128, 128) * 0.02, 4, 128))
    with pytest.raises(TypeError, match="producer_warp"):
        cd.decode_matmul(torch.randn(1, 128, dtype=torch.float16), prep, None, producer_warp=1)
    with pytest.raises(TypeError, match="programmatic_launch"):
        cd.decode_matmul(torch.randn(1, 128, dtype=torch.float16), prep, None,
                         programmatic_launch="yes")
    with pytest.raises(ValueError, match="producer_warp.*M <= 16"):
        cd.decode_matmul(torch.randn(17, 128, dtype=torch.float16), prep, None,
                         producer_warp=True)


def test_producer_warp_table(monkeypatch):
    """The table names blocks per SM per (bits, token tile); nothing below sm_90, and
    never above M = 16."""
    rule = cd._config()["producer_warp"]
    big = int(rule.get("min_units", 0)) + 1
    monkeypatch.setattr(cd, "_capability", lambda index: (9, 0))
    for bits in (4, 8):
        for tile, listed in rule[f"int{bits}"].items():
            assert int(tile) <= cd.PRODUCER_M_MAX
            for bps in range(1, 5):
                assert cd.table_producer_warp(int(tile), bits, bps, big, 0) == (bps in listed)
                if rule.get("min_units", 0) > 0:
                    assert not cd.table_producer_warp(int(tile), bits, bps,
                                                      rule["min_units"] - 1, 0)
    monkeypatch.setattr(cd, "_capability", lambda index: (8, 0))
    assert not any(cd.table_producer_warp(m, bits, bps, 10 ** 6, 0) for m in (1, 16)
                   for bits in (4, 8) for bps in range(1, 5))


def test_programmatic_launch_table():
    """Every token tile of both bit widths has an entry, and the lookup reads it."""
    rule = cd._config()["programmatic_launch"]
    for bits in (4, 8):
        assert set(rule[f"int{bits}"]) == {"8", "16", "32", "64"}
        for m in (1, 8, 9, 16, 17, 33, 64):
            assert cd.table_programmatic_launch(m, bits) == \
                rule[f"int{bits}"][str(cd.m_tile(m))]
    # a small-layer rule marked so is skipped for programmatic launches only
    for bits in (4, 8):
        for tile, small in cd._config()["small_layers"].get(f"int{bits}", {}).items():
            m, units = int(tile), int(small["max_units"])
            assert cd.table_blocks_per_sm(m, bits, units) == small["blocks_per_sm"]
            skipped = not small.get("applies_to_programmatic_launch", True)
            assert cd.table_blocks_per_sm(m, bits, units, programmatic=True) == (
                cd.launch_table()[f"int{bits}"][tile] if skipped else small["blocks_per_sm"])


def test_blocks_per_sm_argument_checked():
    qw = dqgemm.quantize(torch.randn(128, 128) * 0.02, 4, 128)
    prep = cd.prepare_decode(qw)
    with pytest.raises(ValueError, match="blocks_per_sm"):
        cd.decode_matmul(torch.randn(1, 128, dtype=torch.float16), prep, None, blocks_per_sm=0)


@pytest.mark.skipif(_ext.extension() is None, reason="CUDA extension not built")
def test_python_stage_depth_matches_the_launcher():
    """grid_size() counts units with cd.stage_k; the launcher rejects a grid larger than its
    own unit count, so the two must agree for every M and width (no GPU needed)."""
    ext = _ext.extension()
    for bits in (4, 8):
        for m in range(1, 65):
            assert cd.stage_k(m, bits) == ext.decode_gemm_stage_k(m, bits), (m, bits)
            assert cd.m_tile(m) == ext.decode_gemm_m_tile(m), m
