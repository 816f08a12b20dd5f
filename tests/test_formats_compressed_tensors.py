"""compressed-tensors "pack-quantized" import/export, checked against the compressed-tensors
package itself: its PackedQuantizationCompressor.compress builds the checkpoint tensors
from a float weight + scale (+ zero point), .decompress dequantizes them, and
pack_to_int32 / unpack_from_int32 are the reference for the packing.
"""

import pytest
import torch

import dqgemm
from dqgemm.formats import from_compressed_tensors, to_compressed_tensors

from _util import assert_close_product, random_activation

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import (  # noqa: E402
    PackedQuantizationCompressor)
from compressed_tensors.compressors.pack_quantized.helpers import (  # noqa: E402
    pack_to_int32, unpack_from_int32)
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402


def _compress(n, k, bits, strategy, group_size, symmetric, seed):
    gen = torch.Generator().manual_seed(seed)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    groups = 1 if strategy == "channel" else k // group_size
    weight = (torch.randn(n, k, generator=gen) * 0.05).to(torch.float16)
    scale = ((torch.rand(n, groups, generator=gen) + 0.5) * 0.01).to(torch.float16)
    state = {"weight": weight, "weight_scale": scale}
    if not symmetric:
        half = 1 << (bits - 1)
        state["weight_zero_point"] = torch.randint(-half, half, (n, groups), generator=gen,
                                                   dtype=torch.int8)
    compressed = PackedQuantizationCompressor.compress(state, scheme)
    reference = PackedQuantizationCompressor.decompress(dict(compressed), scheme)["weight"]
    return compressed, reference


CASES = [
    # n, k, bits, strategy, group_size, symmetric
    (40, 256, 4, "group", 128, True),
    (40, 256, 4, "group", 32, False),
    (33, 96, 4, "group", 32, False),          # odd N: zero points pad the last word
    (24, 100, 4, "channel", None, True),      # K not a multiple of 8: last word padded
    (24, 100, 4, "channel", None, False),
    (40, 256, 8, "group", 64, True),
    (17, 128, 8, "group", 128, False),
    (24, 90, 8, "channel", None, False),
]


@pytest.mark.parametrize("n,k,bits,strategy,group_size,symmetric", CASES)
def test_matches_compressed_tensors(n, k, bits, strategy, group_size, symmetric):
    c, reference = _compress(n, k, bits, strategy, group_size, symmetric, seed=n * k + bits)
    qw = from_compressed_tensors(c["weight_packed"], c["weight_scale"], c["weight_shape"],
                                 num_bits=bits, group_size=group_size,
                                 weight_zero_point=c.get("weight_zero_point"))
    assert qw.shape == (n, k)
    # One group spanning K is kpack-v1's per-channel group_size=-1.
    assert qw.group_size == (-1 if strategy == "channel" or group_size == k else group_size)
    assert qw.zero_mode == ("symmetric" if symmetric else "zero_points")
    # compressed-tensors dequantizes in the scale dtype (fp16): one rounding of the exact
    # product, which is what our fp32 result rounds to.
    assert reference.dtype == torch.float16
    assert torch.equal(qw.dequantize(torch.float32).to(torch.float16), reference)
    # Codes: the package's own unpacker, shifted to unsigned, equals our codes.
    signed = unpack_from_int32(c["weight_packed"], bits, torch.Size((n, k)))
    assert torch.equal(qw.codes().long(), signed.long() + (1 << (bits - 1)))
    # Export writes the package's tensors back bit for bit.
    back = to_compressed_tensors(qw)
    assert set(back) == set(c)
    for key in c:
        assert torch.equal(back[key], c[key]), key
    # Group size inferred from the scale's shape gives the same weight.
    inferred = from_compressed_tensors(c["weight_packed"], c["weight_scale"], (n, k), bits,
                                       weight_zero_point=c.get("weight_zero_point"))
    assert torch.equal(inferred.dequantize(), qw.dequantize())


def test_pack_to_int32_agrees_with_exporter():
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        half = 1 << (bits - 1)
        signed = torch.randint(-half, half, (9, 70), generator=gen, dtype=torch.int8)
        qw = dqgemm.QuantizedWeight(
            qdata=dqgemm.pack_codes((signed.long() + half), bits),
            scales=torch.ones(9, 1, dtype=torch.float16), bits=bits, group_size=-1,
            in_features=70)
        assert torch.equal(to_compressed_tensors(qw)["weight_packed"],
                           pack_to_int32(signed, bits))


def test_unpacked_zero_points_and_tensor_scale():
    """Older files keep zero points unpacked (int8 [N, G]); 'tensor' has one scale."""
    c, reference = _compress(32, 128, 4, "group", 32, False, seed=3)
    zp = unpack_from_int32(c["weight_zero_point"], 4, torch.Size((32, 4)), packed_dim=0)
    qw = from_compressed_tensors(c["weight_packed"], c["weight_scale"], (32, 128), 4, 32, zp)
    assert torch.equal(qw.dequantize().half(), reference)
    one = torch.tensor([0.01], dtype=torch.float16)
    qw = from_compressed_tensors(c["weight_packed"], one, (32, 128), 4)
    assert qw.group_size == -1 and torch.all(qw.scales == one)


def test_act_order_roundtrip_and_matmul():
    qw = dqgemm.quantize(torch.randn(48, 256) * 0.05, bits=4, group_size=64, symmetric=False)
    g_idx = (torch.arange(256, dtype=torch.int32) // 64)[torch.randperm(256)]
    qw = qw.replace(g_idx=g_idx)
    exported = to_compressed_tensors(qw)
    assert torch.equal(exported["weight_g_idx"], g_idx)
    back = from_compressed_tensors(exported["weight_packed"], exported["weight_scale"],
                                   exported["weight_shape"], 4, 64,
                                   exported["weight_zero_point"], exported["weight_g_idx"])
    assert torch.equal(back.dequantize(), qw.dequantize())
    x = random_activation((4, 256), torch.bfloat16)
    assert_close_product(dqgemm.matmul(x, back, backend="reference"), x, qw.dequantize())


def test_errors():
    c, _ = _compress(32, 128, 4, "group", 32, False, seed=1)
    name = "model.layers.1.mlp.down_proj"
    with pytest.raises(ValueError, match=rf"{name}\.weight_packed: expected shape \(32, 32\) "
                                         r"\(\[N, ceil\(K\*num_bits/32\)\] for "
                                         r"weight_shape=\(32, 128\), num_bits=8\), got \(32, 16\)"):
        from_compressed_tensors(c["weight_packed"], c["weight_scale"], (32, 128), 8, 32,
                                name=name)
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \(32, 2\)"):
        from_compressed_tensors(c["weight_packed"], c["weight_scale"], (32, 128), 4, 64)
    with pytest.raises(ValueError, match=r"weight_zero_point: expected shape \(4, 4\)"):
        from_compressed_tensors(c["weight_packed"], c["weight_scale"], (32, 128), 4, 32,
                                c["weight_zero_point"][:, :2])
    with pytest.raises(ValueError, match=r"weight_shape: expected \(out_features, "
                                         r"in_features\)"):
        from_compressed_tensors(c["weight_packed"], c["weight_scale"], (32, 128, 1), 4, 32)
    bad = torch.zeros(128, dtype=torch.int32)
    bad[0] = 9
    with pytest.raises(ValueError, match=r"weight_g_idx: expected values in \[0, 3\]"):
        from_compressed_tensors(c["weight_packed"], c["weight_scale"], (32, 128), 4, 32,
                                weight_g_idx=bad)
    with pytest.raises(ValueError, match="num_bits: expected bits in"):
        from_compressed_tensors(c["weight_packed"], c["weight_scale"], (32, 128), 2, 32)
