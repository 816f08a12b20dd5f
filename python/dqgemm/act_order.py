"""Act-order (GPTQ desc_act) weights: reorder input rows so groups become contiguous.

A weight with a g_idx assigns input column k to group g_idx[k], in no particular order.
Fast kernels want column k in group k // group_size. Sorting the columns by group (a stable
sort, done once at load time) gives such a weight W_s = W[:, perm]; since
x @ W^T = x[:, perm] @ W_s^T, a kernel then permutes the activation columns once per call
(one gather of M*K elements) and reads the weight with no gather in its inner loop.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .format import QuantizedWeight, effective_group_size, pack_codes


def sort_by_group(qweight: QuantizedWeight) -> Tuple[QuantizedWeight, torch.Tensor]:
    """Returns (sorted weight without g_idx, perm int64 [K]) with x[:, perm] @ W_s^T == x @ W^T.

    Raises ValueError when the groups are not all of size group_size (then no contiguous
    layout exists; such a weight can still run on the reference backend).
    """
    if qweight.g_idx is None:
        raise ValueError("qweight.g_idx: expected an act-order weight with a g_idx, got None")
    qweight.check_g_idx_range()
    g_idx = qweight.g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    gs = effective_group_size(qweight.in_features, qweight.group_size)
    expected = torch.arange(qweight.in_features, device=g_idx.device) // gs
    if not torch.equal(g_idx[perm], expected):
        counts = torch.bincount(g_idx, minlength=qweight.num_groups)
        raise ValueError(
            f"g_idx: expected every group to hold group_size={gs} columns, got group sizes "
            f"from {int(counts.min())} to {int(counts.max())}")
    codes = qweight.codes()[:, perm]
    sorted_weight = qweight.replace(qdata=pack_codes(codes, qweight.bits), g_idx=None)
    return sorted_weight, perm


def has_trivial_g_idx(qweight: QuantizedWeight) -> bool:
    """True when g_idx is absent or equals k // group_size (the permutation is identity)."""
    if qweight.g_idx is None:
        return True
    gs = effective_group_size(qweight.in_features, qweight.group_size)
    expected = torch.arange(qweight.in_features, device=qweight.g_idx.device) // gs
    return bool(torch.equal(qweight.g_idx.long(), expected))


def contiguous_groups(qweight: QuantizedWeight
                      ) -> Tuple[QuantizedWeight, "torch.Tensor | None"]:
    """What a kernel's prepare() wants: a weight without g_idx, and the permutation or None.

    A trivial g_idx (k // group_size) is simply dropped; any other is sorted away
    (sort_by_group), and the returned int64 permutation must be applied to x's columns.
    """
    if qweight.g_idx is None:
        return qweight, None
    if has_trivial_g_idx(qweight):
        return qweight.replace(g_idx=None), None
    return sort_by_group(qweight)
