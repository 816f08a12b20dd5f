"""The cases that are not dqgemm: what dqgemm is measured against.

- torch_fp16 / torch_bf16: torch.nn.functional.linear on the dense weight (cuBLAS on a GPU).
  torch_fp16 is the baseline of every ``speedup_vs_fp16``.
- torch_int4: torch's own INT4 kernel, aten._weight_int4pack_mm ("tinygemm"; bf16
  activations, per-group bf16 scale and zero, w = (q - 8) * scale + zero). Built from the
  same codes and scales as dqgemm's INT4 weight (zero = 0, scales rounded to bf16), checked
  against that weight's own dequantization. On a CPU the _for_cpu variants run.
- gemlite: GemLiteLinear (mobiusml/gemlite), when it is importable; same codes and scales,
  zero points 2^(bits-1). Optional: a failure is reported as not ok, never hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry
from ..reference import dequantize_tensors
from .cases import Method, WeightStore, expected_quantized

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
TINYGEMM_INNER_K_TILES = 8


class DenseMethod(Method):
    family = "torch"
    bits = 16

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.backend = f"torch_{registry.dtype_name(dtype)}"

    def kernel_name(self, store, m):
        return "cublas" if store.device.type == "cuda" else "aten"

    def calls(self, store, m):
        x = store.x(m, self.dtype)
        return [(lambda w=w: F.linear(x, w)) for w in store.dense(self.dtype)]

    def expected(self, store, m):
        return store.expected(m, ("dense", self.dtype), self.dtype,
                              lambda: store.dense(self.dtype)[0].float())


class TorchInt4Method(Method):
    family = "torch"
    backend = "torch_int4"
    bits = 4
    dtype = torch.bfloat16

    def unsupported(self, store, m):
        on_gpu = store.device.type == "cuda"
        op = "_weight_int4pack_mm" if on_gpu else "_weight_int4pack_mm_for_cpu"
        if not hasattr(torch.ops.aten, op):
            return f"this torch has no aten.{op}"
        gs = store.quant.group_size(4)
        if gs not in TINYGEMM_GROUP_SIZES:
            return f"needs group size in {TINYGEMM_GROUP_SIZES}, got {gs}"
        k, n = store.shape.k, store.shape.n
        if k % (TINYGEMM_INNER_K_TILES * 16) or n % 8:
            return f"needs K % {TINYGEMM_INNER_K_TILES * 16} == 0 and N % 8 == 0, got K={k} N={n}"
        if on_gpu and torch.cuda.get_device_capability(store.device) < (8, 0):
            return "needs sm_80 or newer"
        return None

    def kernel_name(self, store, m):
        return "aten._weight_int4pack_mm" + ("" if store.device.type == "cuda" else "_for_cpu")

    def _weights(self, store: WeightStore):
        gs = store.quant.group_size(4)
        on_gpu = store.device.type == "cuda"

        def build():
            out = []
            for qw in store.quantized(4):
                codes = qw.codes()  # uint8 [N, K]
                if on_gpu:
                    # tinygemm's input layout: uint8 [N, K/2], even k in the HIGH nibble.
                    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)
                    w = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(),
                                                                   TINYGEMM_INNER_K_TILES)
                else:
                    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                        codes.to(torch.int32).contiguous(), TINYGEMM_INNER_K_TILES)
                scales = qw.scales.to(torch.bfloat16).t()                 # [G, N]
                sz = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()
                out.append((w, sz))
            return out
        return store.derived(("tinygemm", gs), build), gs

    def calls(self, store, m):
        x = store.x(m, torch.bfloat16)
        weights, gs = self._weights(store)
        op = (torch.ops.aten._weight_int4pack_mm if store.device.type == "cuda"
              else torch.ops.aten._weight_int4pack_mm_for_cpu)
        return [(lambda w=w, sz=sz: op(x, w, gs, sz)) for w, sz in weights]

    def expected(self, store, m):
        qw = store.quantized(4)[0]

        def weight():  # the tinygemm weight exactly: scales rounded to bf16
            return dequantize_tensors(qw.qdata, qw.scales.to(torch.bfloat16), None, None, None,
                                      4, qw.group_size, qw.in_features, torch.float32)
        return store.expected(m, ("tinygemm", 4), torch.bfloat16, weight)


def _gemlite():
    try:
        from gemlite.core import DType, GemLiteLinear
    except Exception as exc:  # not installed, or its import failed (e.g. no GPU)
        return None, f"gemlite not importable ({type(exc).__name__}: {str(exc)[:80]})"
    return (GemLiteLinear, DType), None


class GemliteMethod(Method):
    family = "gemlite"

    def __init__(self, bits: int, dtype: torch.dtype) -> None:
        self.bits = bits
        self.dtype = dtype
        self.backend = "gemlite"

    def unsupported(self, store, m):
        if store.device.type != "cuda":
            return "gemlite needs a CUDA device"
        _, reason = _gemlite()
        return reason

    def kernel_name(self, store, m):
        return "GemLiteLinear"

    def _layers(self, store: WeightStore):
        (GemLiteLinear, DType), _ = _gemlite()
        dt = {torch.float16: DType.FP16, torch.bfloat16: DType.BF16}[self.dtype]

        def build():
            layers = []
            for qw in store.quantized(self.bits):
                gs = qw.group_size if qw.group_size != -1 else qw.in_features
                layer = GemLiteLinear(self.bits, group_size=gs, in_features=qw.in_features,
                                      out_features=qw.out_features, input_dtype=dt,
                                      output_dtype=dt)
                zeros = torch.full_like(qw.scales, float(1 << (self.bits - 1)))
                layer.pack(qw.codes(), qw.scales.to(self.dtype), zeros.to(self.dtype), None)
                layers.append(layer)
            return layers
        return store.derived(("gemlite", self.bits, self.dtype), build)

    def calls(self, store, m):
        x = store.x(m, self.dtype)
        return [(lambda layer=layer: layer(x)) for layer in self._layers(store)]

    def expected(self, store, m):
        return expected_quantized(store, m, self.bits, self.dtype)


def peer_versions() -> dict:
    out = {}
    try:
        import gemlite
        out["gemlite"] = getattr(gemlite, "__version__", "installed")
    except Exception:
        out["gemlite"] = "not installed"
    return out
