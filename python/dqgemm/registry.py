"""One registry decides which kernel serves which problem.

A *kernel* is a Python object (see :class:`Kernel`) that belongs to one *backend*
("reference", "triton" or "cuda"), says with ``supports(problem)`` whether it can run a
problem (returning ``None`` or the reason it cannot), derives its own weight layout once
(``prepare``) and runs the matmul (``run``).

Which kernel serves a call is decided by :func:`select`:
1. the backend the user asked for ("auto" = any) narrows the candidates;
2. the dispatch rules in ``configs/dispatch.json`` (data, measured on each GPU) are tried in
   order, the first rule that matches the problem and names a supporting kernel wins;
3. failing that, the candidates' ``priority`` (higher first) decides.

Nothing here queries a GPU at import time: the device is read off the input tensor when
a call is made.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

BACKENDS = ("reference", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS
_DISPATCH_FILE = os.path.join(os.path.dirname(__file__), "configs", "dispatch.json")


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything dispatch may look at for one matmul call."""

    m: int
    n: int
    k: int
    bits: int
    group_size: int
    dtype: torch.dtype           # activation (and output) dtype
    scale_dtype: torch.dtype
    zero_mode: str               # "symmetric" | "zero_points" | "offsets"
    act_order: bool              # the weight carries a g_idx
    device_type: str             # "cpu" | "cuda" | ...
    device_name: str = ""        # e.g. "NVIDIA H100 80GB HBM3"; "" on CPU
    arch: Tuple[int, int] = (0, 0)  # CUDA compute capability, (0, 0) elsewhere
    # inside dqgemm.programmatic_launch() (dqgemm.launch) on a CUDA device
    programmatic_launch: bool = False


@dataclasses.dataclass
class PreparedWeight:
    """A kernel's own copy of a weight's tensors, derived once from the canonical format.

    The meaning of each field is the kernel's (documented in its prepare()); the reference
    kernel uses the canonical tensors unchanged, with ``act_index`` = g_idx.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zero_points: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None
    act_index: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """The scalar description of a weight passed alongside its tensors."""

    bits: int
    group_size: int
    in_features: int
    out_features: int


class Kernel:
    """Base class of every kernel. Subclasses set ``name``, ``backend``, ``priority``."""

    name: str = ""
    backend: str = ""
    priority: int = 0
    # True when prepare() builds new tensors worth caching; False when it only passes the
    # canonical tensors through (then nothing is cached and torch.compile sees no state).
    caches_prepared: bool = True
    # Kernels that read the same prepared layout name one cache key, so a weight holds one
    # copy of it (cuda_prefill reads cuda_decode's layout). None: the kernel's own name.
    prepared_key: Optional[str] = None

    def supports(self, problem: Problem) -> Optional[str]:
        """None if this kernel can run ``problem``, else a short reason why not."""
        raise NotImplementedError

    def available(self) -> Optional[str]:
        """None if the kernel's machinery is usable here (module built, GPU), else why not."""
        return None

    def prepare(self, qweight) -> PreparedWeight:
        raise NotImplementedError

    def run(self, x: torch.Tensor, prepared: PreparedWeight, bias: Optional[torch.Tensor],
            spec: WeightSpec) -> torch.Tensor:
        """x: contiguous [M, K] on the weight's device. Returns [M, N] in x.dtype."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<kernel {self.name} ({self.backend})>"


_KERNELS: Dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    if kernel.backend not in BACKENDS:
        raise ValueError(f"kernel.backend: expected one of {BACKENDS}, got {kernel.backend!r}")
    if kernel.name in _KERNELS:
        raise ValueError(f"kernel.name: {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel
    return kernel


def _ensure_loaded() -> None:
    # Importing the kernels package registers every kernel (each module calls register()).
    from . import kernels  # noqa: F401


def all_kernels() -> List[Kernel]:
    _ensure_loaded()
    return list(_KERNELS.values())


def get_kernel(name: str) -> Kernel:
    _ensure_loaded()
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"kernel: expected one of {sorted(_KERNELS)}, got {name!r}") from None


# ----------------------------------------------------------------------------------------
# Dispatch rules (data).
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DispatchRule:
    """Use ``kernel`` when every given condition holds. Unset conditions match anything."""

    kernel: str
    device_name: Optional[str] = None   # substring of the device name, e.g. "H100"
    min_arch: Optional[Tuple[int, int]] = None
    bits: Optional[int] = None
    dtype: Optional[str] = None         # "fp16" | "bf16"
    m_min: Optional[int] = None
    m_max: Optional[int] = None
    n_min: Optional[int] = None          # out_features range
    n_max: Optional[int] = None
    programmatic_launch: Optional[bool] = None  # dqgemm.programmatic_launch() on / off
    note: str = ""                       # where the rule came from (measurement, file)

    def matches(self, p: Problem) -> bool:
        if self.device_name is not None and self.device_name not in p.device_name:
            return False
        if self.min_arch is not None and tuple(p.arch) < tuple(self.min_arch):
            return False
        if self.bits is not None and self.bits != p.bits:
            return False
        if self.dtype is not None and self.dtype != dtype_name(p.dtype):
            return False
        if self.m_min is not None and p.m < self.m_min:
            return False
        if self.m_max is not None and p.m > self.m_max:
            return False
        if self.n_min is not None and p.n < self.n_min:
            return False
        if self.n_max is not None and p.n > self.n_max:
            return False
        if (self.programmatic_launch is not None
                and self.programmatic_launch != p.programmatic_launch):
            return False
        return True


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(
        dtype, str(dtype))


@functools.lru_cache(maxsize=None)
def dispatch_rules(path: str = _DISPATCH_FILE) -> Tuple[DispatchRule, ...]:
    with open(path) as f:
        data = json.load(f)
    rules = []
    for entry in data["rules"]:
        entry = dict(entry)
        if "min_arch" in entry and entry["min_arch"] is not None:
            entry["min_arch"] = tuple(entry["min_arch"])
        rules.append(DispatchRule(**entry))
    return tuple(rules)


def _usable(kernel: Kernel, problem: Problem) -> Optional[str]:
    return kernel.available() or kernel.supports(problem)


def candidates(problem: Problem, backend: str = "auto") -> List[Tuple[Kernel, Optional[str]]]:
    """Every registered kernel of ``backend`` with None or the reason it can't serve."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {backend!r}")
    return [(k, _usable(k, problem)) for k in all_kernels()
            if backend == "auto" or k.backend == backend]


def select(problem: Problem, backend: str = "auto") -> Kernel:
    """The kernel that serves ``problem`` under ``backend`` ("auto" or a backend name)."""
    options = candidates(problem, backend)
    usable = {k.name: k for k, reason in options if reason is None}
    for rule in dispatch_rules():
        if rule.kernel in usable and rule.matches(problem):
            return usable[rule.kernel]
    if usable:
        return max(usable.values(), key=lambda k: k.priority)
    reasons = "; ".join(f"{k.name}: {reason}" for k, reason in options) or "none registered"
    raise ValueError(
        f"backend: no {backend!r} kernel can run this problem "
        f"(bits={problem.bits}, group_size={problem.group_size}, "
        f"dtype={dtype_name(problem.dtype)}, M={problem.m}, N={problem.n}, K={problem.k}, "
        f"device={problem.device_type}): {reasons}")
