"""Kernel "reference": dequantize the canonical weight in fp32 and multiply (pure PyTorch).

Serves every problem on every device; it is the fallback of "auto" and the oracle of the
tests. Prepared layout: the canonical tensors themselves (act_index = g_idx).
"""

from __future__ import annotations

from .. import registry
from ..reference import dequantize_tensors, reference_matmul


class ReferenceKernel(registry.Kernel):
    name = "reference"
    backend = "reference"
    priority = 0
    caches_prepared = False

    def supports(self, problem):
        return None

    def prepare(self, qweight):
        return registry.PreparedWeight(qweight.qdata, qweight.scales, qweight.zero_points,
                                       qweight.offsets, qweight.g_idx)

    def run(self, x, prepared, bias, spec):
        weight = dequantize_tensors(prepared.packed, prepared.scales, prepared.zero_points,
                                    prepared.offsets, prepared.act_index, spec.bits,
                                    spec.group_size, spec.in_features)
        return reference_matmul(x, weight, bias)


registry.register(ReferenceKernel())
