"""pytest setup shared by every test file (imported before any of them). Keep it minimal.

Triton's interpreter must be switched on before any @triton.jit kernel is defined, i.e.
before dqgemm.kernels is imported: on a machine without a GPU, run Triton kernels on the
CPU (tests/test_triton.py relies on it; other backends ignore the variable).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
