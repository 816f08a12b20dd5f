"""Access to the compiled CUDA extension dqgemm._C, loaded lazily.

``import dqgemm`` never loads it and never touches CUDA; the first kernel call does.
Also home of the torch -> C enum mappings shared by every CUDA kernel wrapper.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

# Values of dqgemm::DType and dqgemm::ZeroMode in csrc/dqgemm.h.
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
ZERO_MODE_CODES = {"symmetric": 0, "zero_points": 1, "offsets": 2}


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, (f"not built ({exc}); reinstall with nvcc on PATH "
                      f"(pip install --no-build-isolation -e .)")
    return _C, None


def extension():
    """The _C module, or None if it was not built."""
    return _load()[0]


def extension_error() -> Optional[str]:
    """None if the extension imports, else why not."""
    return _load()[1]


def cuda_unavailable_reason() -> Optional[str]:
    """None if CUDA kernels can run here, else a short reason."""
    if extension() is None:
        return f"CUDA extension {extension_error()}"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device``."""
    return torch.cuda.current_stream(device).cuda_stream


def dtype_code(dtype: torch.dtype, what: str) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"{what}: expected float16, bfloat16 or float32, got {dtype}") from None
