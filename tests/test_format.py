import pytest
import torch

import dqgemm
from dqgemm.format import (QuantizedWeight, pack_codes, packed_row_bytes, unpack_codes)


@pytest.mark.parametrize("k", [1, 2, 7, 8, 33, 256])
def test_pack_unpack_round_trip_4bit_every_nibble_position(k):
    # Each of the 16 code values lands in each nibble position (low and high) at least once.
    n = 16
    codes = (torch.arange(n * k).reshape(n, k) + torch.arange(n).unsqueeze(1)) % 16
    packed = pack_codes(codes, 4)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, packed_row_bytes(k, 4)) == (n, (k + 1) // 2)
    assert torch.equal(unpack_codes(packed, 4, k), codes.to(torch.uint8))


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
])
def test_invalid_weights_name_the_argument(change, match):
    qw, _ = _weight()
    fields = dict(qdata=qw.qdata, scales=qw.scales, bits=4, group_size=32, in_features=64)
    fields.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        QuantizedWeight(**fields)


def test_g_idx_out_of_range_is_reported():
    qw, _ = _weight(g_idx=torch.full((64,), 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"g_idx: expected values in \[0, 1\]"):
        qw.check_g_idx_range()


def test_to_moves_and_optionally_casts():
    qw, _ = _weight(zero_points=torch.ones(8, 2).half())
    q32 = qw.to(scale_dtype=torch.float32)
    assert q32.scales.dtype == torch.float32 and q32.zero_points.dtype == torch.float32
    assert q32.qdata.dtype == torch.uint8
    assert torch.equal(q32.dequantize(), qw.dequantize())
    assert "bits=4" in repr(qw) and dqgemm.FORMAT_NAME == "kpack-v1"
