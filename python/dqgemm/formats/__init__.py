"""Checkpoint formats of quantization frameworks <-> dqgemm's canonical kpack-v1.

Importers (each returns a QuantizedWeight whose dequantized weight equals the framework's
own dequantization: exactly, or rounded the same where the framework computes in fp16):

    from_gptq(qweight, qzeros, scales, g_idx=None, bits=4, group_size=128,
              checkpoint_format="gptq")             # GPTQ v1 ("gptq") and "gptq_v2"
    from_awq(qweight, qzeros, scales, group_size=128) # AutoAWQ GEMM layout
    from_compressed_tensors(weight_packed, weight_scale, weight_shape, num_bits,
                            group_size, weight_zero_point=None)   # pack-quantized
    from_gguf(data, ggml_type, shape)                  # Q4_0, Q4_1, Q8_0 blocks

Exporters: to_gptq (gptq_v2 or gptq), to_awq, to_compressed_tensors, to_gguf; and
export_model(model, format) for a whole model's QuantLinear layers (+ its config).
Every importer takes ``name=`` (the layer's name) so errors say which tensor is wrong.
Whole checkpoints: dqgemm.load_quantized.
"""

from .awq import from_awq, to_awq
from .compressed_tensors import (compressed_tensors_scheme, from_compressed_tensors,
                                 to_compressed_tensors)
from .export import EXPORT_FORMATS, export_model
from .gguf import GGML_TYPES, from_gguf, ggml_block_type, to_gguf
from .gptq import from_gptq, gptq_quantize_config, to_gptq

__all__ = [
    "EXPORT_FORMATS", "GGML_TYPES", "compressed_tensors_scheme", "export_model", "from_awq", "from_compressed_tensors",
    "from_gguf", "from_gptq", "ggml_block_type", "gptq_quantize_config", "to_awq",
    "to_compressed_tensors", "to_gguf", "to_gptq",
]
