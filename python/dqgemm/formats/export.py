"""Whole-model export: a model with QuantLinear layers -> a framework's checkpoint.

    tensors, quantization_config = export_model(model, "gptq_v2")
    safetensors.torch.save_file(tensors, "model.safetensors")
    # config.json: {..., "quantization_config": quantization_config}

The result loads back with dqgemm.load_quantized (and, for these formats, with the
frameworks' own loaders). Every QuantLinear is written with the per-layer exporter of the
format; all other parameters and buffers are written as they are.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn

from .awq import to_awq
from .compressed_tensors import compressed_tensors_scheme, to_compressed_tensors
from .gptq import to_gptq

EXPORT_FORMATS = ("gptq", "gptq_v2", "awq", "compressed-tensors")


def export_model(model: nn.Module, format: str = "gptq_v2"
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """-> (state dict in the format's layout, its ``quantization_config``)."""
    from ..nn import QuantLinear
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format: expected one of {EXPORT_FORMATS}, got {format!r}")
    tensors: Dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("model: expected at least one QuantLinear layer to export, found none")
    quantized_names = set()
    schemes: Dict[str, Any] = {}
    for name, layer in layers.items():
        qw = layer.quantized_weight()
        if format in ("gptq", "gptq_v2"):
            exported = to_gptq(qw, format, scale_dtype=qw.scales.dtype, name=name)
            scheme = (qw.bits, qw.group_size, qw.g_idx is not None, qw.zero_points is None)
        elif format == "awq":
            exported = to_awq(qw, scale_dtype=qw.scales.dtype, name=name)
            scheme = (qw.bits, qw.group_size)
        else:
            exported = to_compressed_tensors(qw, name=name)
            scheme = tuple(sorted(compressed_tensors_scheme(qw).items()))
        schemes.setdefault(scheme, []).append(name)
        for key, value in exported.items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()
        quantized_names.update(f"{name}.{b}" for b in
                               ("qdata", "scales", "zero_points", "offsets", "g_idx", "bias"))
    for key, value in model.state_dict().items():
        if key not in quantized_names:
            tensors[key] = value.detach().cpu().contiguous()

    if format == "compressed-tensors":
        groups = {f"group_{i}": {"targets": names, "weights": dict(scheme)}
                  for i, (scheme, names) in enumerate(schemes.items())}
        return tensors, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                         "config_groups": groups}
    if len(schemes) > 1:
        listing = "; ".join(f"{s}: {names[:2]}" for s, names in schemes.items())
        raise ValueError(f"model: {format} holds one bits/group_size setting per checkpoint, "
                         f"the QuantLinear layers have {len(schemes)} ({listing})")
    first = next(iter(layers.values())).quantized_weight()
    if format == "awq":
        return tensors, {"quant_method": "awq", "bits": 4, "group_size": first.group_size,
                         "version": "gemm", "zero_point": first.zero_points is not None}
    return tensors, {"quant_method": "gptq", "bits": first.bits,
                     "group_size": first.group_size, "desc_act": first.g_idx is not None,
                     "sym": first.zero_points is None, "checkpoint_format": format}
