import pytest
import torch
from hypothesis import given, settings, strategies as st

import dqgemm
from _util import random_weight


def _step_and_clipped(w, qw):
    """Per-element step size and whether the element lies outside the representable range."""
    n, k = w.shape
    gs = k if qw.group_size == -1 else qw.group_size
    s = qw.scales.float().repeat_interleave(gs, 1)
    if qw.zero_points is None:
        # dqgemm.quantize uses codes -qmax..qmax (not -qmax - 1: see quantize.py)
        hi = (1 << (qw.bits - 1)) - 1
        lo = -hi
        t = w.float() / torch.where(s == 0, torch.ones_like(s), s)
    else:
        z = qw.zero_points.float().repeat_interleave(gs, 1)
        lo, hi = 0, (1 << qw.bits) - 1
        t = w.float() / torch.where(s == 0, torch.ones_like(s), s) + z
    clipped = (t < lo - 0.5) | (t > hi + 0.5)
    return s, clipped


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_within_half_a_step(bits, group_size, symmetric):
    w = random_weight(48, 512, seed=bits * 1000 + group_size)
    qw = dqgemm.quantize(w, bits, group_size, symmetric)
    s, clipped = _step_and_clipped(w, qw)
    err = (qw.dequantize() - w).abs()
    # Half a step, plus fp32 rounding of the product.
    assert bool((err[~clipped] <= 0.5 * s[~clipped] * (1 + 1e-5) + 1e-7).all())
    if symmetric:
        assert not bool(clipped.any()), "symmetric scales round up: nothing is clipped"
    else:
        # Asymmetric scales round down: only group maxima clamp, by < levels * ulp steps.
        levels = (1 << bits) - 1
        assert bool((err[clipped] <= (0.5 + levels * 2.0 ** -10) * s[clipped]).all())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_requantizing_a_dequantized_weight_is_lossless(bits, symmetric, group_size, scale_dtype):
    w = random_weight(32, 512, seed=7)
    qw = dqgemm.quantize(w, bits, group_size, symmetric, scale_dtype=scale_dtype)
    deq = qw.dequantize()
    again = dqgemm.quantize(deq, bits, group_size, symmetric, scale_dtype=scale_dtype)
    assert torch.equal(again.dequantize(), deq)
    assert torch.equal(again.codes(), qw.codes())


def test_clip_search_lowers_the_error():
    # Gaussian weights: the extreme of a group of 128 wastes most of the 16 levels.
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, 512, generator=gen) * 0.02
    for symmetric in (True, False):
        plain = dqgemm.quantize(w, 4, 128, symmetric)
        clipped = dqgemm.quantize(w, 4, 128, symmetric, clip_search=True)
        e_plain = (plain.dequantize() - w).pow(2).sum().item()
        e_clip = (clipped.dequantize() - w).pow(2).sum().item()
        # Measured: about 0.75x (symmetric) and 0.90x (asymmetric) of the plain error.
        assert e_clip < 0.95 * e_plain, (symmetric, e_clip, e_plain)


def test_all_zero_and_constant_groups_are_exact():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    for symmetric in (True, False):
        qw = dqgemm.quantize(w, 4, 32, symmetric)
        assert torch.allclose(qw.dequantize(), w, atol=0, rtol=1e-3)


def test_scale_dtype_defaults_and_device():
    w = random_weight(8, 64)
    assert dqgemm.quantize(w, group_size=32).scales.dtype == torch.float16
    assert dqgemm.quantize(w.bfloat16(), group_size=32).scales.dtype == torch.bfloat16
    assert dqgemm.quantize(w, group_size=32, scale_dtype=torch.float32).scales.dtype == torch.float32


@pytest.mark.parametrize("weight,kwargs,exc,match", [
    (torch.randn(4, 64), dict(bits=3), ValueError, "bits: expected one of"),
    (torch.randn(4, 100), dict(group_size=32), ValueError, "group_size: expected a divisor"),
    (torch.randn(64), {}, ValueError, "weight: expected a 2-D"),
    (torch.randn(2, 4, 64), {}, ValueError, "weight: expected a 2-D"),
    (torch.randint(0, 3, (4, 64)), {}, TypeError, "weight: expected a floating-point"),
    (torch.tensor([[1.0, float("nan")] * 16]), dict(group_size=32), ValueError, "NaN/Inf"),
    (torch.tensor([[1.0, float("inf")] * 16]), dict(group_size=32), ValueError, "NaN/Inf"),
    (torch.randn(4, 64), dict(group_size=32, scale_dtype=torch.int8), TypeError, "scale_dtype"),
    (torch.tensor([[0.0] * 31 + [float("-inf")]]), dict(group_size=32), ValueError,
     r"weight: expected finite values, got 1 NaN/Inf entries \(first at index \(0, 31\): -inf"),
    (torch.randn(4, 64), dict(bits=4.0), TypeError, r"bits: expected an int.*got 4.0 \(float\)"),
    (torch.randn(4, 64), dict(group_size=32.0), TypeError, "group_size: expected an int"),
    (torch.randn(4, 64), dict(group_size=32, symmetric="no"), TypeError,
     r"symmetric: expected True or False, got 'no' \(str\)"),
    (torch.randn(4, 64), dict(group_size=32, clip_search=1), TypeError,
     "clip_search: expected True or False, got 1"),
    (torch.randn(4, 64, device="meta"), dict(group_size=32), ValueError,
     "weight: expected a tensor holding values, got one on the meta device"),
    ([[1.0] * 32], dict(group_size=32), TypeError, "weight: expected a torch.Tensor, got list"),
    (torch.randn(0, 64), dict(group_size=32), ValueError, "weight: expected a non-empty"),
    (torch.randn(4, 64), dict(group_size=32, clip_search=True, clip_ratios=(1.0, 1.5)),
     ValueError, r"clip_ratios: expected a non-empty list in \(0, 1\]"),
])
def test_bad_input(weight, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dqgemm.quantize(weight, **kwargs)


# derandomize: CI runs the same examples every time (a failure is a bug to fix, not a flake);
# magnitude reaches 1e-5 so that fp16 scales and offsets go subnormal (coarse steps).
@settings(max_examples=150, deadline=None, derandomize=True)
@given(n=st.integers(1, 24), k_groups=st.integers(1, 4),
       group_size=st.sampled_from([32, 64, 128, 256, -1]), bits=st.sampled_from([4, 8]),
       zero_mode=st.sampled_from(["symmetric", "zero_points", "offsets"]),
       seed=st.integers(0, 2**16), magnitude=st.integers(-5, 0),
       scale_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_property_round_trip_and_bounds(n, k_groups, group_size, bits, zero_mode, seed,
                                        magnitude, scale_dtype):
    k = k_groups * (group_size if group_size > 0 else 40) + (0 if group_size > 0 else 1)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 10.0 ** magnitude
    qw = dqgemm.quantize(w, bits, group_size, zero_mode=zero_mode, scale_dtype=scale_dtype)
    assert qw.shape == (n, k) and qw.scales.dtype == scale_dtype
    # Re-quantizing the dequantized weight gives it back exactly.
    again = dqgemm.quantize(qw.dequantize(), bits, group_size, zero_mode=zero_mode,
                            scale_dtype=scale_dtype)
    assert torch.equal(again.dequantize(), qw.dequantize())
    # Codes survive a pack/unpack cycle and the weight survives save/load.
    assert torch.equal(dqgemm.pack_codes(qw.codes(), bits), qw.qdata)
    back = dqgemm.QuantizedWeight.from_tensors(qw.tensors(), qw.metadata())
    assert torch.equal(back.dequantize(), qw.dequantize())
    if zero_mode == "offsets":
        return   # its error bound: test_offsets_mode_min_max
    s, clipped = _step_and_clipped(w, qw)
    err = (qw.dequantize() - w).abs()
    assert bool((err[~clipped] <= 0.5 * s[~clipped] * (1 + 1e-5) + 1e-7).all())
    if zero_mode == "symmetric":
        _check_symmetric_clipping(w, qw)


def _check_symmetric_clipping(w, qw):
    """Symmetric groups clip nothing, except where the scale dtype's step is coarser than
    1 / (2 qmax) of the scale (bf16 at 8 bits, fp16 subnormal scales): there the largest
    magnitude may clamp to code qmax, by less than qmax steps of the scale dtype."""
    s, clipped = _step_and_clipped(w, qw)
    if not bool(clipped.any()):
        return
    qmax = (1 << (qw.bits - 1)) - 1
    scales = qw.scales
    up = torch.nextafter(scales, torch.full_like(scales, float("inf")))
    gs = w.shape[1] if qw.group_size == -1 else qw.group_size
    ulp = (up.float() - scales.float()).repeat_interleave(gs, 1)
    coarse = ulp > s / (2 * qmax)
    assert bool(coarse[clipped].all()), "a group with a fine scale step clipped a weight"
    excess = w.abs() - (qmax + 0.5) * s
    assert bool((excess[clipped] <= qmax * ulp[clipped] * (1 + 1e-5)).all())


def test_fp16_subnormal_scales_round_trip():
    # Groups this small get fp16 scales below 6.1e-5 (subnormal, steps of 6e-8): rounding
    # the scale up can leave absmax at code 126 and rounding it down can put it half a step
    # past 127 (seed 23, row 6: 126.49 and 127.61); the scale rounds down and the largest
    # magnitude clamps to 127, so re-quantizing stays lossless.
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(23, 256, generator=gen) * torch.rand(23, 1, generator=gen) * 3e-3
        for bits, symmetric in ((8, True), (8, False), (4, True), (4, False)):
            qw = dqgemm.quantize(w, bits, 256, symmetric, scale_dtype=torch.float16)
            again = dqgemm.quantize(qw.dequantize(), bits, 256, symmetric,
                                    scale_dtype=torch.float16)
            assert torch.equal(again.dequantize(), qw.dequantize()), (seed, bits, symmetric)
            if symmetric:
                _check_symmetric_clipping(w, qw)


@pytest.mark.parametrize("zero_mode", ["symmetric", "zero_points", "offsets"])
def test_scales_beyond_the_scale_dtype_are_an_error_not_inf(zero_mode):
    w = torch.linspace(-1e6, 2e6, 64).reshape(2, 32)   # scales ~1e5 > fp16 max 65504
    with pytest.raises(ValueError, match=r"scale_dtype: expected a dtype that holds the "
                       r"(scales|offsets) \(largest .*\), got torch.float16 \(max 6.55e\+04\)"):
        dqgemm.quantize(w, 4, 32, zero_mode=zero_mode)
    qw = dqgemm.quantize(w, 4, 32, zero_mode=zero_mode, scale_dtype=torch.float32)
    assert bool(torch.isfinite(qw.dequantize()).all())


def test_bf16_int8_symmetric_groups_reach_the_last_code():
    # bf16 steps are up to 1/128 of a value: rounding the scale up may leave absmax at code
    # 126; the scale rounds down there, so every group's largest magnitude is code +-127.
    w = random_weight(64, 256, seed=4)
    qw = dqgemm.quantize(w, 8, 32, scale_dtype=torch.bfloat16)
    signed = qw.codes().int().reshape(64, 8, 32) - 128
    assert bool((signed.abs().amax(dim=-1) == 127).all())
    assert int(signed.min()) >= -127


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_offsets_mode_min_max(bits, group_size):
    w = random_weight(32, 256, seed=11) + 0.01   # ranges that do not include 0
    qw = dqgemm.quantize(w, bits, group_size, zero_mode="offsets")
    assert qw.zero_mode == "offsets" and qw.zero_points is None
    gs = 256 if group_size == -1 else group_size
    s = qw.scales.float().repeat_interleave(gs, 1)
    o = qw.offsets.float().repeat_interleave(gs, 1)
    err = (qw.dequantize() - w).abs()
    # Half a step, plus the offset's rounding to fp16 and the last code's clamp.
    levels = (1 << bits) - 1
    bound = (0.5 + levels * 2.0 ** -11) * s + o.abs() * 2.0 ** -11 + 1e-7
    assert bool((err <= bound).all())
    # Requantizing is lossless, and the format round-trips through its tensors.
    again = dqgemm.quantize(qw.dequantize(), bits, group_size, zero_mode="offsets")
    assert torch.equal(again.dequantize(), qw.dequantize())
    # Lower error than the zero-point scheme, whose range must include 0.
    zp = dqgemm.quantize(w, bits, group_size, symmetric=False)
    assert (qw.dequantize() - w).pow(2).sum() < (zp.dequantize() - w).pow(2).sum()


def test_unknown_zero_mode_is_named():
    with pytest.raises(ValueError, match="zero_mode: expected"):
        dqgemm.quantize(torch.randn(4, 64), 4, 32, zero_mode="float")
