"""Layer shapes and batch sizes the benchmark sweeps.

A shape is (K, N) = (in_features, out_features) of one linear layer, the nn.Linear
convention: the weight is [N, K], the activation [M, K], the output [M, N].
The Llama-3 sets hold the four distinct projections of one decoder layer with the usual
fusions: QKV (K=hidden, N=q+k+v), O, gate+up (N=2*intermediate), down.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Shape:
    k: int      # in_features
    n: int      # out_features
    name: str = ""

    def __str__(self) -> str:
        return f"{self.k}x{self.n}"


SHAPE_SETS: Dict[str, Tuple[Shape, ...]] = {
    "llama3-8b": (Shape(4096, 6144, "qkv"), Shape(4096, 4096, "o"),
                  Shape(4096, 28672, "gate_up"), Shape(14336, 4096, "down")),
    "llama3-70b": (Shape(8192, 10240, "qkv"), Shape(8192, 8192, "o"),
                   Shape(8192, 57344, "gate_up"), Shape(28672, 8192, "down")),
    # The five layer shapes of ../shared/notes/anchors.md (the H100 peer measurements).
    "anchors": (Shape(4096, 4096), Shape(4096, 14336), Shape(14336, 4096),
                Shape(8192, 28672), Shape(28672, 8192)),
    # Small shapes for CPU runs and CI (odd N on purpose: no kernel may assume N % 64 == 0).
    "quick-cpu": (Shape(256, 512), Shape(512, 320)),
    "quick-gpu": (Shape(4096, 4096, "o"), Shape(14336, 4096, "down")),
}

DEFAULT_SHAPE_SETS = ("llama3-8b", "llama3-70b")
DEFAULT_M: Tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
QUICK_M_CPU: Tuple[int, ...] = (1, 16)
QUICK_M_GPU: Tuple[int, ...] = (1, 16, 256)


def parse_shapes(text: str) -> List[Shape]:
    """'4096x4096,llama3-8b,14336x4096' -> shapes (set names expand; duplicates dropped)."""
    shapes: List[Shape] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in SHAPE_SETS:
            shapes.extend(SHAPE_SETS[item])
            continue
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shapes: expected 'KxN' with positive integers or one of "
                             f"{sorted(SHAPE_SETS)}, got {item!r}")
        shapes.append(Shape(int(parts[0]), int(parts[1])))
    return dedupe(shapes)


def dedupe(shapes: Sequence[Shape]) -> List[Shape]:
    seen, out = set(), []
    for s in shapes:
        if (s.k, s.n) not in seen:
            seen.add((s.k, s.n))
            out.append(s)
    if not out:
        raise ValueError("shapes: expected at least one shape, got none")
    return out


def parse_ints(text: str, what: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected a comma list of integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return values
