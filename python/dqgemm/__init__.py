"""dqgemm: dequantize-fused INT4/INT8 weight-only GEMM kernels for LLM inference.

    import dqgemm
    qw = dqgemm.quantize(linear.weight, bits=4, group_size=128)   # canonical kpack-v1
    y = dqgemm.matmul(x, qw, bias, backend="auto")               # reference/triton/cuda
    layer = dqgemm.QuantLinear.from_linear(linear)                 # drop-in nn.Linear
    summary = dqgemm.quantize_model(model, bits=4, group_size=128)

Importing dqgemm never initializes CUDA or loads the compiled extension.
"""

from . import formats
from .format import FORMAT_NAME, QuantizedWeight, pack_codes, unpack_codes
from .launch import programmatic_launch
from .loading import LoadSummary, load_quantized
from .nn import QuantizationSummary, QuantLinear, quantize_model
from .ops import explain, matmul
from .quantize import quantize
from .registry import BACKENDS

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "FORMAT_NAME", "QuantizedWeight", "QuantLinear", "QuantizationSummary",
    "explain", "matmul", "pack_codes", "programmatic_launch", "quantize", "quantize_model",
    "unpack_codes",
    "__version__",
    "LoadSummary", "formats", "load_quantized",
]
