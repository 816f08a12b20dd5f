import pytest
import torch

import dqgemm
from dqgemm.format import (QuantizedWeight, pack_codes, packed_row_bytes, unpack_codes)


@pytest.mark.parametrize("k", [1, 2, 7, 8, 33, 256])
def test_pack_unpack_round_trip_4bit_every_nibble_position(k):
    # Row n holds (n + col) % 16: every column, so every low and high nibble, sees all 16 values.
    n = 16
    codes = (torch.arange(n).unsqueeze(1) + torch.arange(k)) % 16
    for col in range(k):
        assert sorted(codes[:, col].tolist()) == list(range(16))
    packed = pack_codes(codes, 4)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, packed_row_bytes(k, 4)) == (n, (k + 1) // 2)
    assert torch.equal(unpack_codes(packed, 4, k), codes.to(torch.uint8))


@pytest.mark.parametrize("k", [1, 2, 5, 8, 33])
def test_pack_4bit_puts_each_code_in_its_own_nibble_only(k):
    # One row per (column, value): a single non-zero code must set exactly its own nibble.
    cols = torch.arange(k).repeat_interleave(15)
    values = torch.arange(1, 16).repeat(k)
    codes = torch.zeros(len(cols), k, dtype=torch.int64)
    codes[torch.arange(len(cols)), cols] = values
    packed = pack_codes(codes, 4)
    expected = torch.zeros_like(packed)
    expected[torch.arange(len(cols)), cols // 2] = (values << (4 * (cols % 2))).to(torch.uint8)
    assert torch.equal(packed, expected)
    assert torch.equal(unpack_codes(packed, 4, k), codes.to(torch.uint8))


def test_pack_4bit_matches_a_byte_by_byte_loop():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (5, 37), generator=gen)
    packed = pack_codes(codes, 4).tolist()
    for n, row in enumerate(codes.tolist()):
        row = row + [0]   # odd K: the last high nibble is 0
        assert packed[n] == [row[2 * j] | (row[2 * j + 1] << 4) for j in range(19)]


def test_pack_4bit_byte_layout_is_low_nibble_first():
    codes = torch.tensor([[0x1, 0xA, 0xF, 0x3, 0x7]])
    packed = pack_codes(codes, 4)
    # byte j = q[2j] | q[2j+1] << 4; odd K pads the last high nibble with 0.
    assert packed.tolist() == [[0xA1, 0x3F, 0x07]]


def test_pack_unpack_round_trip_8bit():
    codes = torch.arange(256).reshape(4, 64)
    packed = pack_codes(codes, 8)
    assert packed.tolist() == codes.tolist()
    assert torch.equal(unpack_codes(packed, 8, 64), codes.to(torch.uint8))


@pytest.mark.parametrize("bits,bad", [(4, 16), (4, -1), (8, 256)])
def test_pack_rejects_out_of_range_codes(bits, bad):
    with pytest.raises(ValueError, match="codes: expected values in"):
        pack_codes(torch.tensor([[0, bad]]), bits)


def _weight(n=8, k=64, bits=4, group_size=32, **extra):
    g = k // group_size if group_size > 0 else 1
    codes = torch.randint(0, 1 << bits, (n, k))
    return QuantizedWeight(qdata=pack_codes(codes, bits), scales=torch.rand(n, g).half() + 0.1,
                           bits=bits, group_size=group_size, in_features=k, **extra), codes


def test_dequantize_formulas_match_format_doc():
    n, k, gs = 4, 64, 32
    qw, codes = _weight(n, k, 4, gs)
    s = qw.scales.float().repeat_interleave(gs, 1)
    assert torch.equal(qw.dequantize(), (codes.float() - 8) * s)
    z = torch.randint(0, 16, (n, k // gs)).half()
    qz = qw.replace(zero_points=z)
    assert torch.equal(qz.dequantize(), (codes.float() - z.float().repeat_interleave(gs, 1)) * s)
    o = torch.randn(n, k // gs).half()
    qo = qw.replace(offsets=o)
    assert torch.equal(qo.dequantize(), codes.float() * s + o.float().repeat_interleave(gs, 1))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["symmetric", "zero_points", "offsets"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 256), (8, 64), (8, -1), (4, 128)])
def test_dequantize_every_scale_dtype_mode_and_group(scale_dtype, mode, bits, group_size):
    n, k = 6, 512
    gen = torch.Generator().manual_seed(bits + group_size)
    g = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = (torch.rand(n, g, generator=gen) + 0.05).to(scale_dtype)
    extra = torch.randn(n, g, generator=gen).to(scale_dtype) * (1 << (bits - 1))
    qw = QuantizedWeight(qdata=pack_codes(codes, bits), scales=scales, bits=bits,
                         group_size=group_size, in_features=k,
                         **({} if mode == "symmetric" else {mode: extra}))
    gs = k if group_size == -1 else group_size
    s = scales.double().repeat_interleave(gs, 1)
    e = extra.double().repeat_interleave(gs, 1)
    expected = {"symmetric": (codes - (1 << (bits - 1))) * s, "zero_points": (codes - e) * s,
                "offsets": codes * s + e}[mode]
    assert qw.zero_mode == mode and qw.num_groups == g
    # fp32 arithmetic: each of the (at most two) roundings is within 2^-24 of its operands.
    bound = (expected.abs() + (codes * s).abs() + (e * s).abs() + e.abs()) * 2.0 ** -23
    assert bool(((qw.dequantize().double() - expected).abs() <= bound).all())
    back = QuantizedWeight.from_tensors(qw.tensors(), qw.metadata())
    assert back.scales.dtype == scale_dtype
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_hqq_style_fractional_zero_points_are_exact():
    # HQQ: W = (W_q - zero) * scale with float (fractional) zero and scale per group along K.
    n, k, gs = 8, 128, 64
    gen = torch.Generator().manual_seed(5)
    w_q = torch.randint(0, 16, (n, k), generator=gen)
    zero = (torch.rand(n, k // gs, generator=gen) * 15).half()   # e.g. 7.3828125
    scale = (torch.rand(n, k // gs, generator=gen) * 0.01 + 1e-3).half()
    qw = QuantizedWeight(qdata=pack_codes(w_q, 4), scales=scale, zero_points=zero, bits=4,
                         group_size=gs, in_features=k)
    hqq = ((w_q.float().reshape(n, k // gs, gs) - zero.float().unsqueeze(-1))
           * scale.float().unsqueeze(-1)).reshape(n, k)
    assert not torch.equal(zero.float(), zero.float().round())
    assert torch.equal(qw.dequantize(), hqq)


def test_dequantize_with_g_idx_uses_each_columns_group():
    n, k, gs = 4, 64, 32
    qw, codes = _weight(n, k, 8, gs)
    g_idx = torch.randint(0, 2, (k,), dtype=torch.int32)
    qg = qw.replace(g_idx=g_idx)
    expected = (codes.float() - 128) * qw.scales.float()[:, g_idx.long()]
    assert torch.equal(qg.dequantize(), expected)


def test_tensors_metadata_round_trip():
    qw, _ = _weight(zero_points=torch.ones(8, 2).half())
    back = QuantizedWeight.from_tensors(qw.tensors(), qw.metadata())
    assert back.bits == qw.bits and back.group_size == qw.group_size
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert set(qw.tensors()) == {"qdata", "scales", "zero_points"}


@pytest.mark.parametrize("change,match", [
    (dict(bits=3), "bits: expected one of"),
    (dict(group_size=48), "group_size: expected one of"),
    (dict(group_size=128), "group_size: expected a divisor of in_features=64"),
    (dict(scales=torch.ones(8, 3).half()), r"scales: expected shape \(8, 2\), got \(8, 3\)"),
    (dict(scales=torch.ones(8, 2, dtype=torch.int32)), "scales: expected dtype"),
    (dict(qdata=torch.zeros(8, 31, dtype=torch.uint8)), r"qdata: expected shape \(8, 32\)"),
    (dict(zero_points=torch.ones(8, 2).half(), offsets=torch.ones(8, 2).half()),
     "at most one"),
    (dict(g_idx=torch.zeros(64, dtype=torch.int64)), "g_idx: expected dtype"),
    (dict(bits=4.0), r"bits: expected an int, one of \(4, 8\), got 4.0 \(float\)"),
    (dict(group_size="32"), r"group_size: expected an int, .* got '32' \(str\)"),
    (dict(in_features="64"), r"in_features: expected a positive int, got '64' \(str\)"),
    (dict(in_features=0), "in_features: expected a positive int, got 0"),
    (dict(scales=torch.full((8, 2), float("nan")).half()),
     r"scales: expected finite values, got 16 NaN/Inf entries \(first at index \(0, 0\): nan"),
    (dict(scales=torch.ones(8, 2).half().index_put_((torch.tensor([3]), torch.tensor([1])),
                                                   torch.tensor(float("inf")).half())),
     r"scales: expected finite values, got 1 NaN/Inf entries \(first at index \(3, 1\): inf"),
    (dict(zero_points=torch.full((8, 2), float("-inf")).half()),
     "zero_points: expected finite values"),
    (dict(offsets=torch.full((8, 2), float("nan"))), "offsets: expected finite values"),
    (dict(scales=torch.ones(8, 2).half().to("meta")), "expected one device"),
])
def test_invalid_weights_name_the_argument(change, match):
    qw, _ = _weight()
    fields = dict(qdata=qw.qdata, scales=qw.scales, bits=4, group_size=32, in_features=64)
    fields.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        QuantizedWeight(**fields)


@pytest.mark.parametrize("value", [5, 2, -1])
def test_g_idx_out_of_range_is_reported(value):
    with pytest.raises(ValueError, match=r"g_idx: expected values in \[0, 1\] \(2 groups\), "
                       rf"got range \[{value}, {value}\]"):
        _weight(g_idx=torch.full((64,), value, dtype=torch.int32))
    # On the meta device nothing can be read: only shapes and dtypes are checked.
    qw, _ = _weight()
    meta = qw.to("meta").replace(g_idx=torch.full((64,), value, dtype=torch.int32,
                                                   device="meta"))
    assert meta.g_idx.device.type == "meta"


def test_to_moves_and_optionally_casts():
    qw, _ = _weight(zero_points=torch.ones(8, 2).half())
    q32 = qw.to(scale_dtype=torch.float32)
    assert q32.scales.dtype == torch.float32 and q32.zero_points.dtype == torch.float32
    assert q32.qdata.dtype == torch.uint8
    assert torch.equal(q32.dequantize(), qw.dequantize())
    assert "bits=4" in repr(qw) and dqgemm.FORMAT_NAME == "kpack-v1"


@pytest.mark.parametrize("qdata,bits,k,exc,match", [
    (torch.zeros(2, 4, dtype=torch.int32), 4, 8, TypeError, "qdata: expected dtype"),
    (torch.zeros(2, 2, dtype=torch.uint8), 4, 8, ValueError,
     r"qdata: expected shape \(2, 4\), got \(2, 2\)"),
    (torch.zeros(2, 8, dtype=torch.uint8), 8, 4, ValueError,
     r"qdata: expected shape \(2, 4\), got \(2, 8\)"),
    (torch.zeros(8, dtype=torch.uint8), 8, 8, ValueError, "qdata: expected a 2-D"),
    (torch.zeros(2, 4, dtype=torch.uint8), 4, 0, ValueError, "in_features: expected a positive"),
    (torch.zeros(2, 4, dtype=torch.uint8), 3, 8, ValueError, "bits: expected one of"),
])
def test_unpack_rejects_inconsistent_arguments(qdata, bits, k, exc, match):
    with pytest.raises(exc, match=match):
        unpack_codes(qdata, bits, k)


def test_pack_rejects_non_tensors_and_floats():
    with pytest.raises(TypeError, match="codes: expected a torch.Tensor, got list"):
        pack_codes([[1, 2]], 4)
    with pytest.raises(TypeError, match="codes: expected an integer dtype, got torch.float32"):
        pack_codes(torch.ones(2, 2), 4)
