"""Launch policy of dqgemm's GPU kernels: programmatic dependent launch.

    with dqgemm.programmatic_launch():
        y = model(x)                  # or: capture a CUDA graph of it here

A programmatic dependent launch (compute capability 9.0+, CUDA's
``cudaLaunchAttributeProgrammaticStreamSerialization``) lets a kernel start while the
previous kernel in the stream is still running. dqgemm's decode kernel (cuda_decode, at the
bit widths and token tiles that configs/cuda_decode.json "programmatic_launch" names: they
were measured end to end) then issues the copies of its first weight stages at once, waits
for the previous grid (``griddepcontrol.wait``) only before it reads its activations, and
lets the next kernel launch as soon as it starts (``griddepcontrol.launch_dependents``). In
a decode step, whose kernels are short and depend on each other, that hides each matmul's
launch and its first weight fetch behind the kernel before it. Dispatch (backend "auto")
knows whether the policy is on: configs/dispatch.json may pick another kernel inside it.

It only overlaps anything when the previous kernel allows it (calls launch_dependents or
is itself a programmatic launch that does): dqgemm's decode kernel does, and so do the fused
ops of the end-to-end benchmark (dqgemm.bench.e2e_ops). After any other kernel the launch
behaves like a normal one (the previous grid has completed before this one starts).

Contract while it is enabled: the kernel immediately before a dqgemm matmul in the stream
must not write that matmul's weights (they are read before the wait). dqgemm writes its
prepared weight layouts once, at the first call; that first call therefore runs with a
normal launch.

Off by default: dqgemm's kernel-only benchmark compares each kernel with cuBLAS launched
normally, and a back-to-back run of one kernel would otherwise overlap with itself.
Enabled or not per thread of the Python program; nested uses restore the outer setting.
Reading it never touches the GPU.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_state = threading.local()


def programmatic_launch_enabled() -> bool:
    """Whether dqgemm's kernels are launched as programmatic dependent launches now (where
    the device supports it: compute capability 9.0+)."""
    return bool(getattr(_state, "programmatic", False))


@contextlib.contextmanager
def programmatic_launch(enabled: bool = True) -> Iterator[None]:
    """Within the block, launch dqgemm's kernels as programmatic dependent launches (see the
    module docstring); ``enabled=False`` turns it off inside an enabling block."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {enabled!r}")
    previous = programmatic_launch_enabled()
    _state.programmatic = enabled
    try:
        yield
    finally:
        _state.programmatic = previous
