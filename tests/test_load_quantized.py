"""dqgemm.load_quantized on whole checkpoints: folders (config + sharded safetensors),
single files and bare state dicts, for every format; and the errors a bad checkpoint gives.

Checkpoints are written here with dqgemm's exporters (whose layouts the test_formats_*
files check against the frameworks' own code), then loaded into a fresh float model: the
loaded model must compute exactly what a float model holding the dequantized weights does.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import dqgemm
from dqgemm.formats import compressed_tensors_scheme, to_awq, to_compressed_tensors, to_gptq


class Tiny(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 128)
        self.block = nn.Module()
        self.block.up = nn.Linear(128, 256, bias=True)
        self.block.down = nn.Linear(256, 128, bias=False)
        self.head = nn.Linear(128, 64)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.block.down(torch.relu(self.block.up(h)))
        return self.head(h)


LAYERS = {"block.up": (256, 128), "block.down": (128, 256)}


def _quantized_layers(bits, group_size, symmetric, act_order=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n, k) in LAYERS.items():
        qw = dqgemm.quantize(torch.randn(n, k, generator=gen) * 0.05, bits=bits,
                             group_size=group_size, symmetric=symmetric)
        if act_order:
            gs = k if group_size == -1 else group_size
            g_idx = (torch.arange(k, dtype=torch.int32) // gs)[torch.randperm(k, generator=gen)]
            qw = qw.replace(g_idx=g_idx)
        out[name] = qw
    return out


def _float_tensors(seed=2):
    gen = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(50, 128, generator=gen),
            "block.up.bias": torch.randn(256, generator=gen) * 0.1,
            "head.weight": torch.randn(64, 128, generator=gen) * 0.05,
            "head.bias": torch.randn(64, generator=gen) * 0.1}


def _checkpoint(fmt, layers):
    """(state dict, quantization_config) of ``layers`` written in format ``fmt``."""
    tensors = dict(_float_tensors())
    any_qw = next(iter(layers.values()))
    for name, qw in layers.items():
        if fmt in ("gptq", "gptq_v2"):
            exported = to_gptq(qw, fmt)
        elif fmt == "awq":
            exported = to_awq(qw)
        elif fmt == "compressed-tensors":
            exported = to_compressed_tensors(qw)
        else:
            exported = dict(qw.tensors())
        tensors.update({f"{name}.{k}": v for k, v in exported.items()})
    if fmt in ("gptq", "gptq_v2"):
        config = {"quant_method": "gptq", "bits": any_qw.bits, "group_size": any_qw.group_size,
                  "desc_act": any_qw.g_idx is not None, "sym": any_qw.zero_points is None,
                  "checkpoint_format": fmt}
    elif fmt == "awq":
        config = {"quant_method": "awq", "bits": 4, "group_size": any_qw.group_size,
                  "version": "gemm", "zero_point": True}
    elif fmt == "compressed-tensors":
        config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                  "config_groups": {"group_0": {"targets": ["Linear"],
                                                "weights": compressed_tensors_scheme(any_qw)}},
                  "ignore": ["head"]}
    else:
        config = None
    return tensors, config


def _write_folder(path, tensors, config, shards=2):
    keys = sorted(tensors)
    for i in range(shards):
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps({"model_type": "tiny",
                                                      "quantization_config": config}))
    return path


def _expected_model(layers):
    model = Tiny(seed=0)
    with torch.no_grad():
        for key, value in _float_tensors().items():
            model.get_parameter(key).copy_(value)
        for name, qw in layers.items():
            model.get_submodule(name).weight.copy_(qw.dequantize())
    return model


def _check_loaded(model, layers, summary):
    assert sorted(summary.loaded) == sorted(layers)
    assert summary.kept_float == ["head"]
    assert not summary.unused
    # Quantized layers' biases go into their QuantLinear; the rest are copied as they are.
    assert sorted(summary.other_tensors) == sorted(set(_float_tensors()) - {"block.up.bias"})
    assert torch.equal(model.block.up.bias, _float_tensors()["block.up.bias"])
    for name, qw in layers.items():
        module = model.get_submodule(name)
        assert isinstance(module, dqgemm.QuantLinear)
        assert torch.equal(module.dequantize(), qw.dequantize())
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = _expected_model(layers)(ids)
        got = model(ids)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


FORMAT_CASES = [
    # fmt, bits, group_size, symmetric, act_order
    ("gptq", 4, 128, True, False),
    ("gptq", 4, 32, False, True),
    ("gptq", 8, -1, False, False),
    ("gptq_v2", 4, 64, False, False),
    ("awq", 4, 128, False, False),
    ("awq", 4, 32, True, False),
    ("compressed-tensors", 4, 128, True, False),
    ("compressed-tensors", 8, 32, False, False),
    ("compressed-tensors", 4, -1, False, False),
    ("compressed-tensors", 4, 64, False, True),
    ("kpack-v1", 4, 64, False, True),
]


@pytest.mark.parametrize("fmt,bits,group_size,symmetric,act_order", FORMAT_CASES)
def test_folder_with_config(tmp_path, fmt, bits, group_size, symmetric, act_order):
    layers = _quantized_layers(bits, group_size, symmetric, act_order)
    tensors, config = _checkpoint(fmt, layers)
    folder = _write_folder(tmp_path, tensors, config)
    model = Tiny(seed=7)
    summary = dqgemm.load_quantized(model, folder, backend="reference")
    _check_loaded(model, layers, summary)
    for name, qw in layers.items():
        assert (model.get_submodule(name).g_idx is not None) == act_order
    assert summary.format == (fmt if fmt != "gptq" else "gptq")
    text = str(summary)
    assert "2 linear layers -> QuantLinear" in text and f"{bits}-bit" in text


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors", "kpack-v1"])
def test_state_dict_without_config(fmt):
    """No config: the format, bits and group size come from tensor names and shapes."""
    bits = 8 if fmt in ("gptq", "compressed-tensors") else 4
    layers = _quantized_layers(bits, 64, False)
    tensors, _ = _checkpoint(fmt, layers)
    model = Tiny(seed=3)
    summary = dqgemm.load_quantized(model, tensors, backend="reference")
    _check_loaded(model, layers, summary)
    # The summary names the format each layer was read as (not "gptq or awq").
    assert summary.format == fmt
    assert all(kind.startswith(f"{fmt} {bits}-bit") for kind in summary.kinds), summary.kinds


def test_single_file_and_explicit_format(tmp_path):
    layers = _quantized_layers(4, 128, False)
    tensors, _ = _checkpoint("gptq_v2", layers)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    model = Tiny(seed=5)
    summary = dqgemm.load_quantized(model, str(path), format="gptq_v2", backend="reference")
    _check_loaded(model, layers, summary)
    # The same file read as v1 (the default without a config) gives other zero points.
    model = Tiny(seed=5)
    dqgemm.load_quantized(model, str(path), backend="reference")
    assert not torch.equal(model.block.up.dequantize(), layers["block.up"].dequantize())


def test_load_other_false_and_summary():
    layers = _quantized_layers(4, 128, True)
    tensors, _ = _checkpoint("gptq", layers)
    model = Tiny(seed=6)
    before = model.head.weight.detach().clone()
    summary = dqgemm.load_quantized(model, tensors, format="gptq", load_other=False)
    assert torch.equal(model.head.weight, before)
    assert "head.weight" in summary.unused and "block.up.bias" not in summary.unused
    assert torch.equal(model.block.up.bias, tensors["block.up.bias"])   # layer bias: loaded


# ----------------------------------------------------------------------------------------
# Bad checkpoints.
# ----------------------------------------------------------------------------------------

def _gptq_tensors(**kw):
    tensors, config = _checkpoint("gptq", _quantized_layers(kw.get("bits", 4), 32, False))
    return tensors, config


def test_missing_tensor():
    tensors, _ = _gptq_tensors()
    del tensors["block.down.qzeros"]
    with pytest.raises(ValueError, match=r"block\.down\.qzeros: missing from the checkpoint "
                                         r"\(a gptq layer needs qweight, qzeros, scales\)"):
        dqgemm.load_quantized(Tiny(), tensors)


def test_missing_model_tensors():
    """A model tensor the checkpoint lacks would keep its initial value: strict raises and
    names it; strict=False loads the rest and lists it in the summary."""
    tensors, _ = _gptq_tensors()
    del tensors["embed.weight"]
    with pytest.raises(ValueError, match=r"embed\.weight: missing from the checkpoint \(expected "
                                         r"every tensor of the model; 1 missing: embed\.weight\)"):
        dqgemm.load_quantized(Tiny(), tensors)
    model = Tiny()
    summary = dqgemm.load_quantized(model, tensors, strict=False)
    assert summary.missing == ["embed.weight"]
    assert "1 model tensors missing" in str(summary)
    assert "missing (model values kept): embed.weight" in str(summary)
    assert sorted(summary.loaded) == ["block.down", "block.up"]
    # The bias of a quantized layer counts too.
    tensors, _ = _gptq_tensors()
    del tensors["block.up.bias"]
    with pytest.raises(ValueError, match=r"block\.up\.bias: missing from the checkpoint"):
        dqgemm.load_quantized(Tiny(), tensors)
    # load_other=False: the user keeps the model's other tensors on purpose; nothing checked.
    assert dqgemm.load_quantized(Tiny(), tensors, load_other=False).missing == []


def test_tied_weights_are_not_missing():
    """A tied output head (one tensor, two names) is provided by the embedding's entry."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 128)
            self.block = nn.Module()
            self.block.up = nn.Linear(128, 256, bias=True)
            self.block.down = nn.Linear(256, 128, bias=False)
            self.head = nn.Linear(128, 64, bias=False)
            self.head.weight = self.embed.weight

    tensors, _ = _gptq_tensors()
    for key in ("head.weight", "head.bias"):
        del tensors[key]
    tensors["embed.weight"] = torch.randn(64, 128)
    model = Tied()
    summary = dqgemm.load_quantized(model, tensors)
    assert summary.missing == [] and summary.kept_float == ["head"]
    assert torch.equal(model.head.weight, tensors["embed.weight"])


def test_kpack_errors_name_the_layer():
    tensors, _ = _checkpoint("kpack-v1", _quantized_layers(4, 64, False, act_order=True))
    bad = dict(tensors, **{"block.up.qdata": tensors["block.up.qdata"][:, :10]})
    with pytest.raises(ValueError, match=r"block\.up\.qdata: expected columns "
                                         r"\(ceil\(K\*bits/8\)\) = 64 for 4-bit, 128 for "
                                         r"8-bit, got 10"):
        dqgemm.load_quantized(Tiny(), bad)
    bad = dict(tensors, **{"block.up.scales": tensors["block.up.scales"][:100]})
    with pytest.raises(ValueError, match=r"block\.up\.scales: expected shape \(256, 2\), "
                                         r"got \(100, 2\)"):
        dqgemm.load_quantized(Tiny(), bad)
    g_idx = tensors["block.up.g_idx"].clone()
    g_idx[0] = 77
    bad = dict(tensors, **{"block.up.g_idx": g_idx})
    with pytest.raises(ValueError, match=r"block\.up\.g_idx: expected values in \[0, 1\] "
                                         r"\(2 groups\), got range \[0, 77\]"):
        dqgemm.load_quantized(Tiny(), bad)


def test_groups_not_dividing_in_features():
    tensors, _ = _gptq_tensors()
    tensors["block.up.scales"] = tensors["block.up.scales"][:3]
    with pytest.raises(ValueError, match=r"block\.up\.scales: expected a number of groups that "
                                         r"divides in_features=128, got 3"):
        dqgemm.load_quantized(Tiny(), tensors)


def test_compressed_tensors_bits_mismatch_with_config(tmp_path):
    tensors, config = _checkpoint("compressed-tensors", _quantized_layers(4, 64, False))
    config["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    folder = _write_folder(tmp_path, tensors, config, shards=1)
    with pytest.raises(ValueError, match=r"block\.up\.weight_packed: expected shape \(256, 32\) "
                                         r".*num_bits=8\), got \(256, 16\)"):
        dqgemm.load_quantized(Tiny(), folder)


def test_tensor_the_config_requires_is_missing(tmp_path):
    """Without these, the layer would silently be read as symmetric / without act-order."""
    tensors, config = _checkpoint("gptq", _quantized_layers(4, 32, False, act_order=True))
    del tensors["block.up.g_idx"]
    (tmp_path / "gptq").mkdir()
    folder = _write_folder(tmp_path / "gptq", tensors, config, shards=1)
    with pytest.raises(ValueError, match=r"block\.up\.g_idx: missing from the checkpoint "
                                         r"\(expected because the config has desc_act=true\)"):
        dqgemm.load_quantized(Tiny(), folder)
    tensors, config = _checkpoint("compressed-tensors",
                                  _quantized_layers(4, 64, False, act_order=True))
    assert config["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    for field, why in (("weight_zero_point", "symmetric=false"),
                       ("weight_g_idx", "actorder='group'")):
        bad = {k: v for k, v in tensors.items() if k != f"block.down.{field}"}
        (tmp_path / field).mkdir()
        folder = _write_folder(tmp_path / field, bad, config, shards=1)
        with pytest.raises(ValueError, match=rf"block\.down\.{field}: missing from the "
                                             rf"checkpoint \(expected because the scheme has "
                                             rf"{why}\)"):
            dqgemm.load_quantized(Tiny(), folder)


def test_layer_not_in_model():
    tensors, _ = _gptq_tensors()
    for key in [k for k in tensors if k.startswith("block.down.")]:
        tensors["block.extra." + key.rpartition(".")[2]] = tensors[key]
    with pytest.raises(ValueError, match=r"block\.extra: the checkpoint has a quantized layer "
                                         r"here but the model has no nn\.Linear"):
        dqgemm.load_quantized(Tiny(), tensors)


def test_bits_mismatch_with_config(tmp_path):
    tensors, config = _gptq_tensors(bits=4)
    config["bits"] = 8
    folder = _write_folder(tmp_path, tensors, config, shards=1)
    with pytest.raises(ValueError, match=r"block\.up\.qweight: expected shape \(32, 256\) "
                                         r"\(\[K\*bits/32, N\] for K=128, N=256, bits=8\), "
                                         r"got \(16, 256\)"):
        dqgemm.load_quantized(Tiny(), folder)


def test_bits_not_inferable():
    tensors, _ = _gptq_tensors()
    tensors["block.up.qweight"] = tensors["block.up.qweight"][:5]
    with pytest.raises(ValueError, match=r"block\.up\.qweight: expected rows \(K\*bits/32\) = "
                                         r"16 for 4-bit, 32 for 8-bit, got 5"):
        dqgemm.load_quantized(Tiny(), tensors, format="gptq")


def test_g_idx_out_of_range():
    tensors, _ = _checkpoint("gptq", _quantized_layers(4, 32, False, act_order=True))
    g_idx = tensors["block.up.g_idx"].clone()
    g_idx[3] = 99
    tensors["block.up.g_idx"] = g_idx
    with pytest.raises(ValueError, match=r"block\.up\.g_idx: expected values in \[0, 3\] "
                                         r"\(4 groups\), got range \[0, 99\]"):
        dqgemm.load_quantized(Tiny(), tensors, format="gptq")


def test_float_tensor_shape_mismatch():
    tensors, _ = _gptq_tensors()
    tensors["head.weight"] = torch.zeros(64, 100)
    with pytest.raises(ValueError, match=r"head\.weight: expected shape \(64, 128\)"):
        dqgemm.load_quantized(Tiny(), tensors)


def test_unknown_formats(tmp_path):
    tensors, config = _gptq_tensors()
    with pytest.raises(ValueError, match="format: expected one of"):
        dqgemm.load_quantized(Tiny(), tensors, format="exl2")
    with pytest.raises(ValueError, match="found no quantized tensors"):
        dqgemm.load_quantized(Tiny(), _float_tensors())
    config["quant_method"] = "bitsandbytes"
    folder = _write_folder(tmp_path, tensors, config, shards=1)
    with pytest.raises(ValueError, match=r"quant_method'\]: expected 'gptq', 'awq' or "
                                         r"'compressed-tensors', got 'bitsandbytes'"):
        dqgemm.load_quantized(Tiny(), folder)
    config.update(quant_method="compressed-tensors", format="marlin-24")
    (folder / "config.json").write_text(json.dumps({"quantization_config": config}))
    with pytest.raises(ValueError, match="expected 'pack-quantized', got 'marlin-24'"):
        dqgemm.load_quantized(Tiny(), folder)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        dqgemm.load_quantized(Tiny(), str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="source: expected a state dict"):
        dqgemm.load_quantized(Tiny(), 42)


def test_meta_device_model():
    """A model built without memory (device="meta") is materialized by the checkpoint."""
    layers = _quantized_layers(4, 64, False)
    tensors, _ = _checkpoint("awq", layers)
    with torch.device("meta"):
        model = Tiny()
    summary = dqgemm.load_quantized(model, tensors, backend="reference")
    assert not any(t.is_meta for t in model.state_dict().values())
    _check_loaded(model, layers, summary)


@pytest.mark.parametrize("fmt,bits,symmetric", [
    ("gptq_v2", 4, False), ("gptq", 8, True), ("awq", 4, False), ("compressed-tensors", 8, False),
])
def test_export_model_roundtrip(tmp_path, fmt, bits, symmetric):
    """quantize_model -> export_model -> safetensors folder -> load_quantized: same model."""
    source = Tiny(seed=11)
    dqgemm.quantize_model(source, bits=bits, group_size=64, symmetric=symmetric)
    tensors, config = dqgemm.formats.export_model(source, fmt)
    assert config["quant_method"] in fmt
    folder = _write_folder(tmp_path, tensors, config)
    loaded = Tiny(seed=12)
    summary = dqgemm.load_quantized(loaded, folder)
    assert sorted(summary.loaded) == ["block.down", "block.up", "head"]
    assert not summary.unused and not summary.kept_float
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), source(ids))
    for name in summary.loaded:
        assert torch.equal(loaded.get_submodule(name).dequantize(),
                           source.get_submodule(name).dequantize())


def test_export_model_errors():
    with pytest.raises(ValueError, match="format: expected one of"):
        dqgemm.formats.export_model(Tiny(), "gguf")
    with pytest.raises(ValueError, match="found none"):
        dqgemm.formats.export_model(Tiny(), "gptq")
    model = Tiny()
    dqgemm.quantize_model(model, bits=4, group_size=64, skip=["head"])
    model.head = dqgemm.QuantLinear.from_linear(nn.Linear(128, 64), bits=8, group_size=32)
    with pytest.raises(ValueError, match="one bits/group_size setting per checkpoint"):
        dqgemm.formats.export_model(model, "gptq")
    # compressed-tensors holds one scheme per config group: mixed layers export and load.
    tensors, config = dqgemm.formats.export_model(model, "compressed-tensors")
    assert len(config["config_groups"]) == 2
    loaded = Tiny(seed=3)
    with torch.no_grad():
        summary = dqgemm.load_quantized(loaded, tensors, format="compressed-tensors")
    assert len(summary.loaded) == 3 and loaded.head.bits == 8
    assert torch.equal(loaded.head.dequantize(), model.head.dequantize())
