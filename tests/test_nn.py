"""QuantLinear and quantize_model: drop-in behaviour, state, training on top, compile."""

import io

import pytest
import torch
from torch import nn

import dqgemm
from dqgemm import QuantLinear
from _util import assert_close_product, random_activation


def _linear(k=128, n=48, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, True), (4, 32, False),
                                                       (8, -1, True), (8, 64, False)])
def test_from_linear_matches_quantize(bits, group_size, symmetric):
    lin = _linear()
    q = QuantLinear.from_linear(lin, bits=bits, group_size=group_size, symmetric=symmetric)
    qw = dqgemm.quantize(lin.weight, bits, group_size, symmetric)
    for name, tensor in qw.tensors().items():
        assert torch.equal(getattr(q, name), tensor), name
    x = random_activation((2, 7, 128), torch.float32)
    out = q(x)
    assert out.shape == (2, 7, 48)
    assert_close_product(out.reshape(-1, 48), x.reshape(-1, 128), qw.dequantize(), lin.bias)


def test_repr_names_bits_group_and_backend():
    q = QuantLinear.from_linear(_linear(), bits=8, group_size=64, backend="reference")
    text = repr(q)
    assert "bits=8" in text and "group_size=64" in text and "backend='reference'" in text


def test_half_casts_bias_but_keeps_quantization_dtypes():
    q = QuantLinear.from_linear(_linear(), bits=4, group_size=32, symmetric=False)
    before = q.dequantize()
    q = q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16
    assert q.scales.dtype == torch.float16 and q.zero_points.dtype == torch.float16
    assert q.qdata.dtype == torch.uint8
    assert torch.equal(q.dequantize(), before)
    out = q(random_activation((3, 128), torch.bfloat16))
    assert out.dtype == torch.bfloat16
    q.half()
    assert q.bias.dtype == torch.float16 and q.scales.dtype == torch.float16


def test_state_dict_round_trip_gives_identical_outputs(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    dqgemm.quantize_model(model, bits=4, group_size=32, symmetric=False)
    x = random_activation((5, 128), torch.float32)
    expected = model(x)

    # A fresh copy of the architecture, quantized from different random weights.
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    dqgemm.quantize_model(fresh, bits=4, group_size=32, symmetric=False)
    assert not torch.equal(fresh(x), expected)

    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    fresh.load_state_dict(load_file(str(path)))
    assert torch.equal(fresh(x), expected)

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(2)
    other = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    dqgemm.quantize_model(other, bits=4, group_size=32, symmetric=False)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other(x), expected)


@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16])
def test_load_keeps_the_saved_scale_dtype(tmp_path, saved_dtype):
    # Copying fp32 / bf16 scales into a fresh copy's fp16 buffers would change the weight.
    from safetensors.torch import load_file, save_file
    src = QuantLinear.from_linear(_linear(), bits=4, group_size=32, symmetric=False,
                                  scale_dtype=saved_dtype)
    fresh = QuantLinear.from_linear(_linear(seed=1), bits=4, group_size=32, symmetric=False)
    assert fresh.scales.dtype == torch.float16
    path = tmp_path / "layer.safetensors"
    save_file(src.state_dict(), str(path))
    fresh.load_state_dict(load_file(str(path)))
    assert fresh.scales.dtype == saved_dtype and fresh.zero_points.dtype == saved_dtype
    x = random_activation((4, 128), torch.float32)
    assert torch.equal(fresh(x), src(x))


@pytest.mark.parametrize("key,value,exc,match", [
    ("qdata", lambda t: t.float(), TypeError,
     "qdata: expected dtype torch.uint8, got torch.float32"),
    ("scales", lambda t: t.double(), TypeError,
     "scales: expected float16, bfloat16 or float32, got torch.float64"),
    ("scales", lambda t: torch.full_like(t, float("nan")), ValueError,
     "scales: expected finite values"),
    ("zero_points", lambda t: t.index_fill(0, torch.tensor([2]), float("inf")), ValueError,
     r"zero_points: expected finite values, got 4 NaN/Inf entries \(first at index \(2, 0\)"),
])
def test_load_rejects_bad_quantization_tensors(key, value, exc, match):
    src = QuantLinear.from_linear(_linear(), bits=4, group_size=32, symmetric=False)
    state = src.state_dict()
    state[key] = value(state[key])
    with pytest.raises(exc, match=match):
        QuantLinear(128, 48, bits=4, group_size=32, symmetric=False).load_state_dict(state)


def test_load_rejects_a_g_idx_naming_missing_groups():
    src = QuantLinear(128, 48, bits=4, group_size=64, act_order=True)
    state = src.state_dict()
    state["g_idx"] = torch.full((128,), 7, dtype=torch.int64)   # int64 is converted; 7 is not
    with pytest.raises(ValueError, match=r"g_idx: expected values in \[0, 1\]"):
        QuantLinear(128, 48, bits=4, group_size=64, act_order=True).load_state_dict(state)
    state["g_idx"] = torch.arange(128, dtype=torch.int64) % 2
    dst = QuantLinear(128, 48, bits=4, group_size=64, act_order=True)
    dst.load_state_dict(state)
    assert dst.g_idx.dtype == torch.int32 and dst.g_idx.tolist() == state["g_idx"].tolist()


def test_to_device_and_dtype_together_moves_but_keeps_quantization_dtypes():
    q = QuantLinear.from_linear(_linear(), bits=4, group_size=32, symmetric=False)
    moved = q.to("meta", torch.bfloat16)
    assert {t.device.type for t in moved.state_dict().values()} == {"meta"}
    assert moved.qdata.dtype == torch.uint8 and moved.scales.dtype == torch.float16
    assert moved.zero_points.dtype == torch.float16 and moved.bias.dtype == torch.bfloat16
    assert moved(torch.empty(2, 128, device="meta", dtype=torch.bfloat16)).shape == (2, 48)


@pytest.mark.parametrize("args,exc,match", [
    ((0, 8), ValueError, "in_features: expected a positive int, got 0"),
    ((64, -1), ValueError, "out_features: expected a positive int, got -1"),
    ((64.0, 8), TypeError, r"in_features: expected a positive int, got 64.0 \(float\)"),
])
def test_constructor_checks_sizes(args, exc, match):
    with pytest.raises(exc, match=match):
        QuantLinear(*args, group_size=32)


def test_empty_module_loads_state_dict():
    src = QuantLinear.from_linear(_linear(), bits=8, group_size=-1)
    dst = QuantLinear(128, 48, bits=8, group_size=-1)
    dst.load_state_dict(src.state_dict())
    x = random_activation((2, 128), torch.float32)
    assert torch.equal(dst(x), src(x))


def test_lora_adapter_trains_on_top_of_frozen_quantized_weight():
    torch.manual_seed(0)
    base = QuantLinear.from_linear(_linear(64, 32), bits=4, group_size=32)
    lora_a = nn.Parameter(torch.randn(4, 64) * 0.1)
    lora_b = nn.Parameter(torch.zeros(32, 4))
    opt = torch.optim.Adam([lora_a, lora_b], lr=0.02)
    x = torch.randn(16, 64)
    # A target the adapter can reach: the base output plus a rank-4 correction.
    target = base(x).detach() + x @ (torch.randn(64, 4) @ torch.randn(4, 32)) * 0.1
    x_in = x.clone().requires_grad_()
    losses = []
    for _ in range(60):
        out = base(x_in) + (x_in @ lora_a.t()) @ lora_b.t()
        loss = (out - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    assert x_in.grad is not None and torch.isfinite(x_in.grad).all()
    assert all(not b.requires_grad for b in base.buffers())
    assert base.bias.grad is None


def test_quantize_model_summary_skip_and_filter(capsys):
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "proj": nn.Linear(128, 64), "odd": nn.Linear(100, 64),
        "lm_head": nn.Linear(64, 10), "gate": nn.Linear(256, 64)})
    summary = dqgemm.quantize_model(model, bits=4, group_size=64, skip=["lm_head"],
                                    filter=lambda name, m: name != "gate", verbose=True)
    assert summary.quantized == ["proj"]
    reasons = dict(summary.skipped)
    assert "not divisible by group_size=64" in reasons["odd"]
    assert "skip pattern" in reasons["lm_head"]
    assert "filter" in reasons["gate"]
    assert isinstance(model["proj"], QuantLinear) and isinstance(model["odd"], nn.Linear)
    assert summary.bytes_before == 128 * 64 * 4
    assert summary.bytes_after == model["proj"].weight_nbytes
    printed = capsys.readouterr().out
    assert "quantized 1 linear layers, skipped 3" in printed
    # 128 x 64 fp32 weights = 32 KiB; INT4 g64 codes 4 KiB + fp16 scales 256 B = 4.25 KiB.
    assert "weight memory of quantized layers: 32.00 KiB -> 4.25 KiB (7.53x smaller)" in printed
    assert "skipped odd: in_features=100 not divisible by group_size=64" in printed


def test_quantize_model_lists_linear_subclasses_as_skipped():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(64, 4), "fc": nn.Linear(64, 64)})
    summary = dqgemm.quantize_model(model, bits=8, group_size=32)
    assert summary.quantized == ["fc"]
    reasons = dict(summary.skipped)
    assert "NonDynamicallyQuantizableLinear is a subclass of nn.Linear" in reasons["attn.out_proj"]
    x = torch.randn(5, 1, 64)
    assert model["attn"](x, x, x)[0].shape == (5, 1, 64)


def test_summary_units():
    from dqgemm.nn import format_bytes
    assert [format_bytes(b) for b in (512, 1536, 3 * 2**20, 2**31)] == [
        "512 B", "1.50 KiB", "3.00 MiB", "2.00 GiB"]


def test_quantize_model_shows_progress_bar(capsys):
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(10)])
    dqgemm.quantize_model(model, bits=8, group_size=32, progress=True)
    err = capsys.readouterr().err
    assert "quantizing to INT8" in err and "10/10" in err


def test_compile_fullgraph_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    dqgemm.quantize_model(model, bits=4, group_size=32)
    x = torch.randn(4, 128)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected)
    compiled_inductor = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled_inductor(x), expected, rtol=1e-5, atol=1e-5)
