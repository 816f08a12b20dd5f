"""dqgemm.load_quantized: run a quantization framework's checkpoint on dqgemm's kernels.

    summary = dqgemm.load_quantized(model, "path/to/checkpoint")   # folder, file or state dict
    print(summary)

The model is an ordinary float model (e.g. a transformers model built from the checkpoint's
config). Every nn.Linear whose quantized tensors are in the checkpoint is replaced, in place,
by a QuantLinear holding the weight converted exactly into kpack-v1 (dqgemm.formats); the
checkpoint's other tensors that name a parameter or buffer of the model (norms, embeddings,
biases) are copied into it. Layers the checkpoint leaves in float (e.g. lm_head) stay
nn.Linear and are listed in the summary. A tensor of the model that the checkpoint does not
provide (a missing norm weight, bias or embedding, which would silently keep its initial
value) is an error with strict=True and is listed in the summary with strict=False.

Sources:
  - a state dict {name: tensor};
  - a .safetensors file, or a folder of them (sharded or not), with the quantization config
    read from config.json ("quantization_config"), quantize_config.json or quant_config.json
    in the same folder;
  - a .gguf file (or a gguf.GGUFReader) of a llama-architecture model: tensor names are
    mapped to transformers' names and the Q/K rows that llama.cpp's converter permutes for
    its rotary layout are put back, as transformers does when it dequantizes the file.

Formats: "auto" (from the config, else from the tensor names and shapes: GPTQ and AWQ
both have qweight/qzeros/scales and are told apart by qweight's shape; GPTQ without a
config is read as v1, the common "gptq" format), "gptq", "gptq_v2", "awq",
"compressed-tensors", "gguf" or "kpack-v1" (dqgemm's own QuantLinear state dict).

Act-order GPTQ / compressed-tensors layers keep their g_idx: each kernel sorts the columns
by group once when it prepares the weight (dqgemm.act_order.sort_by_group) and permutes
the activations once per call, so its inner loop reads sequential groups.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from .format import FORMAT_NAME, QuantizedWeight
from .formats import from_awq, from_compressed_tensors, from_gguf, from_gptq
from .formats._common import tensor_name
from .formats.gguf import GGML_TYPES
from .nn import QuantLinear

FORMATS = ("auto", "gptq", "gptq_v2", "awq", "compressed-tensors", "gguf", FORMAT_NAME)

# The tensor that marks a layer as quantized in each format, and all the tensors it needs.
_LAYOUT = {
    "gptq": ("qweight", ("qweight", "qzeros", "scales")),
    "awq": ("qweight", ("qweight", "qzeros", "scales")),
    "compressed-tensors": ("weight_packed", ("weight_packed", "weight_scale")),
    FORMAT_NAME: ("qdata", ("qdata", "scales")),
}
_OPTIONAL = {
    "gptq": ("g_idx", "bias"),
    "awq": ("bias",),
    "compressed-tensors": ("weight_shape", "weight_zero_point", "weight_g_idx", "bias"),
    FORMAT_NAME: ("zero_points", "offsets", "g_idx", "bias"),
}
_MARKERS = ("qweight", "weight_packed", "qdata")


@dataclasses.dataclass
class LoadSummary:
    """What load_quantized did."""

    format: str
    loaded: List[str] = dataclasses.field(default_factory=list)           # QuantLinear now
    kinds: Counter = dataclasses.field(default_factory=Counter)           # "4-bit g128 ..." -> n
    other_tensors: List[str] = dataclasses.field(default_factory=list)    # float tensors copied
    kept_float: List[str] = dataclasses.field(default_factory=list)       # Linears not in ckpt
    unused: List[str] = dataclasses.field(default_factory=list)           # ckpt tensors unused
    missing: List[str] = dataclasses.field(default_factory=list)          # model tensors absent
    notes: List[str] = dataclasses.field(default_factory=list)
    bytes_quantized: int = 0

    def __str__(self) -> str:
        lines = [f"load_quantized ({self.format}): {len(self.loaded)} linear layers -> "
                 f"QuantLinear ({self.bytes_quantized / 2**20:.2f} MiB of quantized tensors), "
                 f"{len(self.other_tensors)} other tensors copied, "
                 f"{len(self.kept_float)} linear layers kept in float, "
                 f"{len(self.unused)} checkpoint tensors unused"
                 + (f", {len(self.missing)} model tensors missing" if self.missing else "")]
        for kind, count in sorted(self.kinds.items()):
            lines.append(f"  {count:5d} x {kind}")
        if self.kept_float:
            lines.append(f"  kept in float: {', '.join(self.kept_float[:8])}"
                         + (" ..." if len(self.kept_float) > 8 else ""))
        if self.unused:
            lines.append(f"  unused: {', '.join(self.unused[:8])}"
                         + (" ..." if len(self.unused) > 8 else ""))
        if self.missing:
            lines.append(f"  missing (model values kept): {', '.join(self.missing[:8])}"
                         + (" ..." if len(self.missing) > 8 else ""))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------

class _SafetensorsFiles(Mapping):
    """Tensors of one or more .safetensors files, read on access."""

    def __init__(self, files: Iterable[str]) -> None:
        from safetensors import safe_open
        self._where: Dict[str, str] = {}
        self._open = {}
        for path in files:
            handle = safe_open(path, framework="pt")
            self._open[path] = handle
            for key in handle.keys():
                self._where[key] = path

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._open[self._where[key]].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _quant_config_in(folder: str) -> Optional[Dict[str, Any]]:
    config = _read_json(os.path.join(folder, "config.json"))
    if config and isinstance(config.get("quantization_config"), dict):
        return config["quantization_config"]
    for name in ("quantize_config.json", "quant_config.json", "quantization_config.json"):
        found = _read_json(os.path.join(folder, name))
        if found is not None:
            return found
    return None


def _open_source(source) -> Tuple[str, Any, Optional[Dict[str, Any]]]:
    """-> (kind, tensors or GGUF reader, quantization config or None)."""
    if isinstance(source, Mapping):
        return "tensors", source, None
    if type(source).__name__ == "GGUFReader":
        return "gguf", source, None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected a state dict, a path (.safetensors file, .gguf file "
                        f"or folder) or a gguf.GGUFReader, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".safetensors"))
        if not files:
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return _open_source(os.path.join(path, ggufs[0]))
            raise ValueError(f"source: expected a folder with .safetensors files (or one .gguf "
                             f"file), found none in {path!r}")
        return "tensors", _SafetensorsFiles(files), _quant_config_in(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source: no such file or folder: {path!r}")
    if path.endswith(".gguf"):
        from gguf import GGUFReader
        return "gguf", GGUFReader(path), None
    if path.endswith(".safetensors"):
        return "tensors", _SafetensorsFiles([path]), _quant_config_in(os.path.dirname(path) or ".")
    raise ValueError(f"source: expected a .safetensors or .gguf file or a folder, got {path!r}")


# ----------------------------------------------------------------------------------------
# Format detection and per-layer parameters.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Scheme:
    format: str                      # "gptq", "awq", "compressed-tensors", kpack-v1
    checkpoint_format: str = "gptq"  # GPTQ only: "gptq" or "gptq_v2"
    bits: Optional[int] = None       # None: inferred from shapes
    group_size: Optional[int] = None
    ignore: Tuple[str, ...] = ()     # compressed-tensors "ignore" list
    groups: Tuple[Tuple[Tuple[str, ...], Dict[str, Any]], ...] = ()  # c-t (targets, args)
    act_order: bool = False          # GPTQ desc_act: every layer must have its g_idx


def _scheme_from_config(config: Dict[str, Any], format: str) -> Optional[_Scheme]:
    method = str(config.get("quant_method", config.get("quantization_method", ""))).lower()
    if format in ("gptq", "gptq_v2") or (format == "auto" and method == "gptq"):
        ckpt = config.get("checkpoint_format", config.get("format", "gptq"))
        if format == "gptq_v2":
            ckpt = "gptq_v2"
        if ckpt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config['checkpoint_format']: expected 'gptq' or "
                             f"'gptq_v2', got {ckpt!r}")
        return _Scheme("gptq", ckpt, config.get("bits"), config.get("group_size"),
                       act_order=bool(config.get("desc_act")))
    if format == "awq" or (format == "auto" and method == "awq"):
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config['version']: expected 'gemm' (the AWQ layout "
                             f"dqgemm reads), got {version!r}")
        return _Scheme("awq", bits=config.get("bits", config.get("w_bit")),
                       group_size=config.get("group_size", config.get("q_group_size")))
    if format == "compressed-tensors" or (format == "auto" and method == "compressed-tensors"):
        fmt = config.get("format", "pack-quantized")
        if fmt != "pack-quantized":
            raise ValueError(f"quantization_config['format']: expected 'pack-quantized', "
                             f"got {fmt!r}")
        groups = []
        for group in (config.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            groups.append((tuple(group.get("targets", ["Linear"])), weights))
        return _Scheme("compressed-tensors", ignore=tuple(config.get("ignore") or ()),
                       groups=tuple(groups))
    if format == "auto" and method:
        raise ValueError(f"quantization_config['quant_method']: expected 'gptq', 'awq' or "
                         f"'compressed-tensors', got {method!r}")
    return None


def _scheme_from_names(tensors: Mapping, format: str) -> _Scheme:
    if format in ("gptq", "gptq_v2"):
        return _Scheme("gptq", "gptq_v2" if format == "gptq_v2" else "gptq")
    if format in ("awq", "compressed-tensors", FORMAT_NAME):
        return _Scheme(format)
    suffixes = {key.rpartition(".")[2] for key in tensors}
    if "weight_packed" in suffixes:
        return _Scheme("compressed-tensors")
    if "qdata" in suffixes:
        return _Scheme(FORMAT_NAME)
    if "qweight" in suffixes:
        return _Scheme("gptq_or_awq")
    raise ValueError("source: found no quantized tensors (expected names ending in .qweight "
                     "(GPTQ/AWQ), .weight_packed (compressed-tensors) or .qdata (kpack-v1)); "
                     "pass format= if the checkpoint is of a known format")


def _ct_args(scheme: _Scheme, name: str) -> Optional[Dict[str, Any]]:
    """The compressed-tensors weight args for layer ``name`` (None: ignored / no group)."""
    for pattern in scheme.ignore:
        if _ct_match(pattern, name):
            return None
    if not scheme.groups:
        return {}
    for targets, args in scheme.groups:
        if any(t == "Linear" or _ct_match(t, name) for t in targets):
            return args
    return None


def _ct_match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _infer_bits(actual: int, expected: Dict[int, int], name: str, what: str) -> int:
    """The bits whose packed size ``expected[bits]`` equals ``actual``."""
    for bits, size in expected.items():
        if actual == size:
            return bits
    listing = ", ".join(f"{size} for {bits}-bit" for bits, size in expected.items())
    raise ValueError(f"{name}: expected {what} = {listing}, got {actual}")


def _infer_group_size(groups: int, in_features: int, name: str) -> int:
    if groups == 1:
        return -1
    if groups <= 0 or in_features % groups:
        raise ValueError(f"{name}: expected a number of groups that divides "
                         f"in_features={in_features}, got {groups}")
    return in_features // groups


# ----------------------------------------------------------------------------------------
# One layer.
# ----------------------------------------------------------------------------------------

def _require(tensors: Mapping, prefix: str, fields: Iterable[str], fmt: str) -> Dict[str, Any]:
    out = {}
    for field in fields:
        key = tensor_name(prefix, field)
        if key not in tensors:
            raise ValueError(f"{key}: missing from the checkpoint (a {fmt} layer needs "
                             f"{', '.join(fields)})")
        out[field] = tensors[key]
    return out


def _optional(tensors: Mapping, prefix: str, fields: Iterable[str]) -> Dict[str, Any]:
    return {f: tensors[tensor_name(prefix, f)] for f in fields
            if tensor_name(prefix, f) in tensors}


def _require_if(got: Dict[str, Any], name: str, field: str, needed: bool, why: str) -> None:
    """A tensor the config makes necessary (reading the layer without it would be wrong)."""
    if needed and field not in got:
        raise ValueError(f"{tensor_name(name, field)}: missing from the checkpoint (expected "
                         f"because {why})")


def _gptq_layer(scheme: _Scheme, got: Dict[str, Any], name: str, n: int, k: int
                ) -> QuantizedWeight:
    _require_if(got, name, "g_idx", scheme.act_order, "the config has desc_act=true")
    qw_rows = got["qweight"].shape[0] if got["qweight"].dim() == 2 else -1
    bits = scheme.bits or _infer_bits(qw_rows, {4: k // 8, 8: k // 4},
                                      tensor_name(name, "qweight"), "rows (K*bits/32)")
    gs = scheme.group_size
    if gs is None:
        gs = _infer_group_size(got["scales"].shape[0], k, tensor_name(name, "scales"))
    return from_gptq(got["qweight"], got["qzeros"], got["scales"], got.get("g_idx"), bits=bits,
                     group_size=gs, checkpoint_format=scheme.checkpoint_format, name=name,
                     in_features=k, out_features=n)


def _awq_layer(scheme: _Scheme, got: Dict[str, Any], name: str, n: int, k: int
               ) -> QuantizedWeight:
    gs = scheme.group_size
    if gs is None:
        gs = _infer_group_size(got["scales"].shape[0], k, tensor_name(name, "scales"))
    return from_awq(got["qweight"], got["qzeros"], got["scales"], group_size=gs,
                    bits=scheme.bits or 4, name=name, in_features=k, out_features=n)


def _ct_layer(scheme: _Scheme, got: Dict[str, Any], name: str, n: int, k: int
              ) -> QuantizedWeight:
    args = _ct_args(scheme, name) or {}
    _require_if(got, name, "weight_zero_point", args.get("symmetric") is False,
                "the scheme has symmetric=false")
    _require_if(got, name, "weight_g_idx", args.get("actorder") in ("group", "dynamic"),
                f"the scheme has actorder={args.get('actorder')!r}")
    packed = got["weight_packed"]
    cols = packed.shape[1] if packed.dim() == 2 else -1
    bits = args.get("num_bits") or _infer_bits(
        cols, {4: -(-k // 8), 8: -(-k // 4)}, tensor_name(name, "weight_packed"),
        "columns (ceil(K*bits/32))")
    shape = got.get("weight_shape", torch.tensor([n, k]))
    if isinstance(shape, torch.Tensor):
        shape = shape.tolist()
    if tuple(int(v) for v in shape) != (n, k):
        raise ValueError(f"{tensor_name(name, 'weight_shape')}: expected ({n}, {k}) (the "
                         f"model's Linear), got {tuple(shape)}")
    gs = -1 if args.get("strategy") == "channel" else args.get("group_size")
    return from_compressed_tensors(packed, got["weight_scale"], (n, k), bits, gs,
                                   got.get("weight_zero_point"), got.get("weight_g_idx"),
                                   name=name)


def _kpack_layer(scheme: _Scheme, got: Dict[str, Any], name: str, n: int, k: int
                 ) -> QuantizedWeight:
    """dqgemm's own QuantLinear tensors; QuantizedWeight's errors get the layer's name."""
    del scheme, n
    qdata, scales = got["qdata"], got["scales"]
    cols = qdata.shape[-1] if qdata.dim() == 2 else -1
    bits = _infer_bits(cols, {4: (k + 1) // 2, 8: k}, tensor_name(name, "qdata"),
                       "columns (ceil(K*bits/8))")
    gs = _infer_group_size(scales.shape[-1] if scales.dim() == 2 else -1, k,
                           tensor_name(name, "scales"))
    try:
        qw = QuantizedWeight(qdata=qdata, scales=scales, bits=bits, group_size=gs,
                             in_features=k, zero_points=got.get("zero_points"),
                             offsets=got.get("offsets"), g_idx=got.get("g_idx"))
        qw.check_g_idx_range()
    except (ValueError, TypeError) as err:      # messages start with the field's name
        raise type(err)(tensor_name(name, str(err))) from None
    return qw


_IMPORTERS = {"gptq": _gptq_layer, "awq": _awq_layer, "compressed-tensors": _ct_layer,
              FORMAT_NAME: _kpack_layer}


def _layer_format(scheme: _Scheme, tensors: Mapping, name: str, linear: nn.Linear) -> str:
    """The layer's format; without a config GPTQ and AWQ are told apart by qweight's shape."""
    if scheme.format != "gptq_or_awq":
        return scheme.format
    qweight = tensors[tensor_name(name, "qweight")]
    awq_shape = (linear.in_features, linear.out_features // 8)
    return "awq" if tuple(qweight.shape) == awq_shape else "gptq"


def _import_layer(scheme: _Scheme, tensors: Mapping, name: str, linear: nn.Linear
                  ) -> Tuple[QuantizedWeight, List[str], str]:
    """-> (QuantizedWeight, checkpoint keys consumed, the layer's format)."""
    n, k = linear.out_features, linear.in_features
    fmt = _layer_format(scheme, tensors, name, linear)
    _, needed = _LAYOUT[fmt]
    got = _require(tensors, name, needed, fmt)
    got.update(_optional(tensors, name, _OPTIONAL[fmt]))
    qw = _IMPORTERS[fmt](scheme, got, name, n, k)
    if qw.out_features != n or qw.in_features != k:
        raise ValueError(f"{name}: expected a weight of shape ({n}, {k}) (the model's Linear), "
                         f"got {qw.shape} from the checkpoint")
    return qw, [tensor_name(name, f) for f in got], fmt


def _kind(qw: QuantizedWeight, fmt: str) -> str:
    gs = "per-channel" if qw.group_size == -1 else f"g{qw.group_size}"
    act = ", act_order" if qw.g_idx is not None else ""
    return f"{fmt} {qw.bits}-bit {gs} {qw.zero_mode}{act}"


def _placed(qw: QuantizedWeight, linear: nn.Linear) -> QuantizedWeight:
    """The weight on the device of the Linear it replaces (left where it is for meta)."""
    device = linear.weight.device
    return qw if device.type == "meta" or device == qw.device else qw.to(device)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _bias_for(linear: nn.Linear, bias_from_ckpt: Optional[torch.Tensor], name: str
              ) -> Optional[torch.Tensor]:
    if bias_from_ckpt is None:
        return None if linear.bias is None or linear.bias.is_meta else linear.bias.detach()
    if tuple(bias_from_ckpt.shape) != (linear.out_features,):
        raise ValueError(f"{tensor_name(name, 'bias')}: expected shape ({linear.out_features},), "
                         f"got {tuple(bias_from_ckpt.shape)}")
    dtype = linear.bias.dtype if linear.bias is not None else bias_from_ckpt.dtype
    return bias_from_ckpt.to(dtype)


def _copy_into(model: nn.Module, key: str, value: torch.Tensor) -> bool:
    """Copies a float checkpoint tensor into the model's parameter/buffer ``key``."""
    module_name, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    target = module._parameters.get(leaf) if leaf in module._parameters else \
        module._buffers.get(leaf) if leaf in module._buffers else None
    if target is None:
        return False
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"{key}: expected shape {tuple(target.shape)} (the model's tensor), "
                         f"got {tuple(value.shape)}")
    with torch.no_grad():
        if target.is_meta:
            new = value.to(target.dtype)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(new, requires_grad=target.requires_grad)
            else:
                module._buffers[leaf] = new
        else:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    return True


# ----------------------------------------------------------------------------------------
# The entry point.
# ----------------------------------------------------------------------------------------

def load_quantized(model: nn.Module, source, format: str = "auto", *, backend: str = "auto",
                   load_other: bool = True, strict: bool = True,
                   verbose: bool = False) -> LoadSummary:
    """Replaces the model's quantized Linear layers with QuantLinear, loaded from ``source``.

    Args:
        model: the float model (modified in place).
        source: a state dict, a .safetensors file, a folder, a .gguf file or a GGUFReader.
        format: one of FORMATS ("auto" reads the config, else the tensor names).
        backend: the QuantLinear backend ("auto", "reference", "triton", "cuda").
        load_other: also copy the checkpoint's float tensors that name model tensors.
        strict: raise when the checkpoint has a quantized layer the model has no Linear
            for, or (with load_other) lacks a tensor of the model; strict=False lists the
            missing ones in ``summary.missing`` and leaves their values as they were.
        verbose: print the summary.

    The model is modified in place as far as loading got when an error is raised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    kind, opened, config = _open_source(source)
    groups = _tensor_groups(model)
    if kind == "gguf" or format == "gguf":
        if kind != "gguf":
            raise ValueError("format: 'gguf' needs a .gguf file or a GGUFReader as source")
        summary, provided = _load_gguf(model, opened, backend, load_other, strict)
    else:
        summary, provided = _load_tensors(model, opened, config, format, backend, load_other,
                                          strict)
    if load_other:
        summary.missing = _missing(groups, provided, model)
        if strict:
            _raise_if_missing(summary.missing)
    if verbose:
        print(summary)
    return summary


def _tensor_groups(model: nn.Module) -> List[List[str]]:
    """The model's state-dict names, grouped by tensor (tied weights share one group)."""
    groups: Dict[int, List[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(key)
    return list(groups.values())


def _missing(groups: List[List[str]], provided: Set[str], model: nn.Module) -> List[str]:
    """Model tensors the checkpoint did not provide: a group (see _tensor_groups) none of
    whose names was loaded, and any tensor still on the meta device after loading."""
    missing = {names[0] for names in groups if not provided.intersection(names)}
    missing.update(key for key, value in model.state_dict(keep_vars=True).items()
                   if value.is_meta)
    return sorted(missing)


def _raise_if_missing(missing: List[str]) -> None:
    if missing:
        listing = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ValueError(f"{missing[0]}: missing from the checkpoint (expected every tensor of "
                         f"the model; {len(missing)} missing: {listing}); pass strict=False to "
                         f"keep the model's own values for them")


def _load_tensors(model, tensors: Mapping, config, format, backend, load_other, strict
                  ) -> Tuple[LoadSummary, Set[str]]:
    """-> (summary, the model tensor names the checkpoint provided)."""
    scheme = _scheme_from_config(config, format) if config else None
    if scheme is None:
        scheme = _scheme_from_names(tensors, format)
    summary = LoadSummary(format=scheme.format if scheme.format != "gptq" else
                          scheme.checkpoint_format)
    if scheme.format == "gptq_or_awq":
        summary.notes.append("no quantization config: GPTQ layers read as v1 ('gptq'); pass "
                             "format='gptq_v2' for v2 checkpoints")
    keys = set(tensors.keys())
    used, provided, formats = set(), set(), set()
    quantized_prefixes = {key.rpartition(".")[0] for key in keys
                          if key.rpartition(".")[2] in _MARKERS}
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    linear_names = {name for name, _ in linears}
    if strict:
        orphans = sorted(quantized_prefixes - linear_names)
        if orphans:
            raise ValueError(f"{orphans[0]}: the checkpoint has a quantized layer here but the "
                             f"model has no nn.Linear of that name ({len(orphans)} such "
                             f"layer(s): {', '.join(orphans[:4])})")
    for name, linear in linears:
        if name not in quantized_prefixes:
            summary.kept_float.append(name)
            continue
        qw, consumed, fmt = _import_layer(scheme, tensors, name, linear)
        label = scheme.checkpoint_format if fmt == "gptq" else fmt
        formats.add(label)
        bias_key = tensor_name(name, "bias")
        bias = _bias_for(linear, tensors[bias_key] if bias_key in keys else None, name)
        if bias is not None:
            bias = bias.to(linear.weight.device) if not linear.weight.is_meta else bias
        layer = QuantLinear.from_quantized(_placed(qw, linear), bias, backend=backend)
        _replace(model, name, layer)
        used.update(consumed)
        provided.add(tensor_name(name, "weight"))
        if bias_key in keys:
            provided.add(bias_key)
        summary.loaded.append(name)
        summary.kinds[_kind(qw, label)] += 1
        summary.bytes_quantized += qw.nbytes
    if scheme.format == "gptq_or_awq" and formats:
        summary.format = "+".join(sorted(formats))
    for key in sorted(keys - used):
        if load_other and _copy_into(model, key, tensors[key]):
            summary.other_tensors.append(key)
            provided.add(key)
        else:
            summary.unused.append(key)
    return summary, provided


# ----------------------------------------------------------------------------------------
# GGUF (llama architecture).
# ----------------------------------------------------------------------------------------

_GGUF_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}
_GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    part = field.parts[field.data[0]]
    return bytes(part).decode() if part.dtype == "uint8" else part[0]


def _gguf_hf_name(gguf_name: str) -> Optional[str]:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match:
        mapped = _GGUF_LLAMA_BLOCK.get(match.group(2))
        return None if mapped is None else f"model.layers.{match.group(1)}.{mapped}.{suffix}"
    mapped = _GGUF_LLAMA_TOP.get(base)
    return None if mapped is None else f"{mapped}.{suffix}"


def unpermute_rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's Q/K permutation: out[i] = in[perm[i]].

    llama.cpp's converter stores each head's rows interleaved as (dim/2, 2) pairs; the
    transformers layout is (2, dim/2). Rows only move, so the quantized rows (whose groups
    run along K) are permuted exactly.
    """
    if n_rows % (2 * n_head):
        raise ValueError(f"n_head: {n_head} heads do not split {n_rows} rows into pairs")
    half = n_rows // n_head // 2
    return torch.arange(n_rows).reshape(n_head, half, 2).transpose(1, 2).reshape(-1)


def permute_rows(qw: QuantizedWeight, perm: torch.Tensor) -> QuantizedWeight:
    """The weight with output rows reordered: row i of the result is row perm[i]."""
    def take(t):
        return None if t is None else t.index_select(0, perm.to(t.device)).contiguous()
    return qw.replace(qdata=take(qw.qdata), scales=take(qw.scales),
                      zero_points=take(qw.zero_points), offsets=take(qw.offsets))


def _load_gguf(model, reader, backend, load_other, strict) -> Tuple[LoadSummary, Set[str]]:
    """-> (summary, the model tensor names (transformers') the file provided)."""
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture: load_quantized maps GGUF tensor names for "
                         f"'llama' models only, got {arch!r}")
    n_head = int(_gguf_field(reader, "llama.attention.head_count"))
    n_kv = int(_gguf_field(reader, "llama.attention.head_count_kv") or n_head)
    summary = LoadSummary(format="gguf")
    modules = dict(model.named_modules())
    by_hf = {}
    for tensor in reader.tensors:
        hf = _gguf_hf_name(tensor.name)
        if hf is None:       # e.g. llama 3's rope_freqs: transformers computes it itself
            summary.unused.append(tensor.name)
            continue
        by_hf[hf] = tensor

    def quantized(tensor, hf_module: str) -> QuantizedWeight:
        ttype = tensor.tensor_type.name
        if ttype not in GGML_TYPES:
            raise ValueError(f"{tensor.name}: GGUF type {ttype} is not supported for linear "
                             f"weights; expected one of {tuple(GGML_TYPES)}")
        shape = tuple(int(v) for v in reversed(tensor.shape.tolist()))
        qw = from_gguf(tensor.data, ttype, shape, name=tensor.name)
        leaf = hf_module.rpartition(".")[2]
        if leaf in ("q_proj", "k_proj"):
            heads = n_head if leaf == "q_proj" else n_kv
            qw = permute_rows(qw, unpermute_rope_rows(qw.out_features, heads))
        return qw

    linears = {name for name, m in modules.items() if isinstance(m, nn.Linear)}
    for hf, tensor in by_hf.items():
        module_name = hf.rpartition(".")[0]
        ttype = tensor.tensor_type.name
        module = modules.get(module_name)
        if module_name in linears and hf.endswith(".weight") and ttype in GGML_TYPES:
            qw = quantized(tensor, module_name)
            _check_linear_shape(module, qw, tensor.name)
            _replace(model, module_name, QuantLinear.from_quantized(
                _placed(qw, module), _bias_for(module, None, module_name), backend=backend))
            summary.loaded.append(module_name)
            summary.kinds[f"gguf {ttype} -> {_kind(qw, 'kpack-v1')}"] += 1
            summary.bytes_quantized += qw.nbytes
            continue
        if module is None:
            if strict:
                raise ValueError(f"{tensor.name}: the model has no module {module_name!r} for "
                                 f"this tensor")
            summary.unused.append(tensor.name)
            continue
        if not load_other:
            summary.unused.append(tensor.name)
            continue
        if ttype in GGML_TYPES:
            shape = tuple(int(v) for v in reversed(tensor.shape.tolist()))
            value = from_gguf(tensor.data, ttype, shape, name=tensor.name).dequantize()
        elif ttype in _GGUF_FLOAT_TYPES:
            value = torch.from_numpy(tensor.data.copy()).float()
        else:
            raise ValueError(f"{tensor.name}: GGUF type {ttype} is not supported; expected one "
                             f"of {tuple(GGML_TYPES) + _GGUF_FLOAT_TYPES}")
        if not _copy_into(model, hf, value.reshape(
                tuple(int(v) for v in reversed(tensor.shape.tolist())))):
            summary.unused.append(tensor.name)
            continue
        summary.other_tensors.append(hf)
    # Tied output head: llama.cpp omits output.weight and uses token_embd for it.
    if "lm_head.weight" not in by_hf and "lm_head" in linears and \
            "model.embed_tokens.weight" in by_hf:
        tensor = by_hf["model.embed_tokens.weight"]
        if tensor.tensor_type.name in GGML_TYPES:
            qw = quantized(tensor, "lm_head")
            head = modules["lm_head"]
            _check_linear_shape(head, qw, tensor.name)
            _replace(model, "lm_head", QuantLinear.from_quantized(
                _placed(qw, head), _bias_for(head, None, "lm_head"), backend=backend))
            summary.loaded.append("lm_head")
            summary.kinds[f"gguf {tensor.tensor_type.name} -> {_kind(qw, 'kpack-v1')}"] += 1
            summary.bytes_quantized += qw.nbytes
            summary.notes.append("lm_head tied to token_embd: loaded from token_embd.weight")
    summary.kept_float = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    provided = {tensor_name(n, "weight") for n in summary.loaded} | set(summary.other_tensors)
    return summary, provided


def _check_linear_shape(module: nn.Linear, qw: QuantizedWeight, name: str) -> None:
    if (module.out_features, module.in_features) != qw.shape:
        raise ValueError(f"{name}: expected shape ({module.out_features}, {module.in_features}) "
                         f"(the model's Linear, [out, in]), got {qw.shape}")
