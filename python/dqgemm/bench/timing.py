"""Timers: kernel-only time from CUDA graph replays, eager time, cold L2.

Method (the same as ../shared/notes/anchors.md, so the numbers compare):
- A case is a list of *calls*, one per weight copy. The copies together hold at least
  3x the L2 (``copies_for``), so each call reads its weight from HBM as in a real model,
  where every layer's weight is touched once per forward pass.
- Warm-up: every call runs twice on a side stream first (module loads, Triton JIT,
  cuBLAS handles, dqgemm's prepared-layout cache), then once more eagerly.
- Kernel-only time: one CUDA graph that makes every call once; after ``warmup`` replays,
  ``reps`` (>= 15) replays are timed with CUDA events, each its own pair of events; the
  median replay time / number of copies is the time per call. Graph replays remove the
  CPU launch cost, so this is what the GPU spends.
- Eager time: the same calls launched from Python without a graph, timed the same way;
  it includes the CPU overhead a user sees without graphs (on a fast GPU, small calls
  are CPU-bound and this is much larger).
- On a CPU device both numbers are the wall-clock median of ``reps`` loops.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, List, Optional, Sequence

import torch

ROTATION_FACTOR = 3.0     # weight copies total >= this many times the L2
MAX_COPIES = 64
MIN_REPS = 15


@dataclasses.dataclass
class Timing:
    us: Optional[float]            # kernel-only time per call (graph replay median)
    eager_us: Optional[float]      # eager time per call (median)
    timer: str                     # "cuda_graph" | "cuda_eager" | "cpu_wall"
    reps: int
    copies: int
    spread_pct: Optional[float]    # interquartile range of the timed samples / median
    note: str = ""


# Used only if torch does not report the L2 size: larger than any current GPU's L2, so the
# rotation still exceeds 3x the real one.
FALLBACK_L2_BYTES = 128 << 20


def l2_bytes(device: torch.device) -> int:
    """L2 size of a CUDA device (0 elsewhere)."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    size = int(getattr(props, "L2_cache_size", 0) or getattr(props, "l2_cache_size", 0) or 0)
    return size or FALLBACK_L2_BYTES


def copies_for(weight_bytes: int, device: torch.device, factor: float = ROTATION_FACTOR,
               max_copies: int = MAX_COPIES) -> int:
    """How many copies of a weight of ``weight_bytes`` make >= ``factor`` x L2 together."""
    l2 = l2_bytes(device)
    if l2 <= 0 or weight_bytes <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(factor * l2 / weight_bytes)))


def _spread(samples: List[float]) -> Optional[float]:
    if len(samples) < 4:
        return None
    q = statistics.quantiles(samples, n=4)
    med = statistics.median(samples)
    return 100.0 * (q[2] - q[0]) / med if med > 0 else None


def _event_samples(fn: Callable[[], Any], reps: int) -> List[float]:
    """Microseconds of ``reps`` runs of fn, each between its own pair of CUDA events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [1000.0 * s.elapsed_time(e) for s, e in zip(starts, ends)]


def _run_all(calls: Sequence[Callable[[], Any]]) -> None:
    for call in calls:
        call()


def time_calls(calls: Sequence[Callable[[], Any]], device: torch.device,
               reps: int = MIN_REPS, warmup: int = 3, graph: bool = True) -> Timing:
    """Times ``calls`` (one per weight copy); see the module docstring for the method."""
    if not calls:
        raise ValueError("calls: expected at least one callable, got none")
    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")
    n = len(calls)
    if device.type != "cuda":
        for call in calls:
            call()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _run_all(calls)
            samples.append(1e6 * (time.perf_counter() - t0))
        med = statistics.median(samples) / n
        return Timing(med, med, "cpu_wall", reps, n, _spread(samples))

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            _run_all(calls)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)

    _run_all(calls)  # one eager warm-up on the current stream
    eager = _event_samples(lambda: _run_all(calls), reps)
    eager_us = statistics.median(eager) / n
    if not graph:
        return Timing(eager_us, eager_us, "cuda_eager", reps, n, _spread(eager),
                      "graphs disabled: us is the eager time")

    g = torch.cuda.CUDAGraph()
    outputs = None
    try:
        with torch.cuda.graph(g):
            outputs = [call() for call in calls]
    except Exception as exc:  # some kernels cannot be captured; report, don't hide
        torch.cuda.synchronize(device)
        return Timing(eager_us, eager_us, "cuda_eager", reps, n, _spread(eager),
                      f"graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); "
                      f"us is the eager time")
    for _ in range(warmup):
        g.replay()
    samples = _event_samples(g.replay, reps)
    us = statistics.median(samples) / n
    del outputs  # the graph and its outputs are freed on return, before the next case
    return Timing(us, eager_us, "cuda_graph", reps, n, _spread(samples))


def capture_graph(fn: Callable[[], Any], device: Optional[torch.device] = None
                  ) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of fn(), captured on a side stream after one warm-up call there
    (dqgemm's kernels cache their workspaces per stream, so the capture allocates none;
    fn's own effects, such as a decode step advancing its position, happen once more)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
