"""Kernel implementations. Importing this package registers each one with the registry.

One module per kernel family; each module's header says what it computes, its layouts,
constraints, and how to test and benchmark it. Modules must import without a GPU (and
without triton installed): they check what they need in ``Kernel.available()``.
"""

from . import reference  # noqa: F401
from . import cuda_dequant  # noqa: F401
from . import cuda_decode  # noqa: F401
from . import cuda_prefill  # noqa: F401
from . import triton_common, triton_gemv, triton_splitk, triton_gemm, triton_dequant  # noqa: F401,E401,E501
