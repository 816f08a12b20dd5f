"""What one benchmark case is, the weights it runs on, and the dqgemm cases.

A *method* is one way to compute y = x @ W^T for a layer shape: FP16 cuBLAS, torch's INT4
kernel, dqgemm through ``dqgemm.matmul(backend=...)``, or one registered dqgemm kernel
called directly. For each (shape, M) the runner asks a method whether it can run
(``unsupported``), for its calls (one per weight copy, see timing.py), and for the fp32
product its output must match (``expected``).

The dqgemm methods are discovered, never listed by hand:
- ``OpMethod``: "auto" and each backend of ``registry.BACKENDS``, through the public
  ``dqgemm.matmul`` (validation, the custom op, dispatch and the prepared-layout cache:
  exactly what a user calls). The record's ``kernel`` says which kernel dispatch chose.
- ``KernelMethod``: each kernel of ``registry.all_kernels()`` called directly
  (``prepare`` once per copy, then ``run``), for the problems where its backend's
  dispatch would pick another kernel; where dispatch picks it, its backend's row is it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import ops, registry
from ..format import QuantizedWeight
from ..quantize import quantize
from . import roofline, timing
from .shapes import Shape

Call = Callable[[], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    group_size_int4: int = 128
    group_size_int8: int = -1          # per output channel, as in anchors.md
    scale_dtype: torch.dtype = torch.float16

    def group_size(self, bits: int) -> int:
        return self.group_size_int4 if bits == 4 else self.group_size_int8


class WeightStore:
    """The weights of one layer shape on one device: a random dense master weight, its
    quantized forms, and copies of each (enough to exceed 3x the L2, see timing.py).

    Every copy holds the same values at a different address; every value is random
    (never zeros). Derived layouts (a peer's packing) are cached with ``derived``.
    """

    def __init__(self, shape: Shape, device: torch.device, quant: QuantSettings,
                 seed: int = 0, rotate: bool = True) -> None:
        self.shape = shape
        self.device = device
        self.quant = quant
        self.rotate = rotate
        gen = torch.Generator(device=device).manual_seed(seed)
        # std 0.02 as in LLM initializations; fp16 so the FP16 baseline uses it unchanged
        self.master = (torch.randn(shape.n, shape.k, device=device, generator=gen)
                       * 0.02).to(torch.float16)
        self._gen = gen
        self._cache: Dict = {}
        self._per_m: Dict = {}
        self._m: Optional[int] = None

    # -- copies -------------------------------------------------------------------------
    def copies(self, nbytes: int) -> int:
        return timing.copies_for(nbytes, self.device) if self.rotate else 1

    def derived(self, key, build: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def dense(self, dtype: torch.dtype) -> List[torch.Tensor]:
        def build():
            w = self.master.to(dtype)
            n = self.copies(w.numel() * w.element_size())
            return [w] + [w.clone() for _ in range(n - 1)]
        return self.derived(("dense", dtype), build)

    def quantized(self, bits: int) -> List[QuantizedWeight]:
        def build():
            qw = quantize(self.master.float(), bits=bits,
                          group_size=self.quant.group_size(bits), symmetric=True,
                          scale_dtype=self.quant.scale_dtype)
            n = self.copies(qw.nbytes)
            return [qw] + [clone_qweight(qw) for _ in range(n - 1)]
        return self.derived(("quantized", bits), build)

    # -- per-M data ---------------------------------------------------------------------
    def set_m(self, m: int) -> None:
        if m != self._m:
            self._per_m.clear()
            self._m = m

    def x(self, m: int, dtype: torch.dtype) -> torch.Tensor:
        """The activation [M, K]: one random fp32 draw per M, cast to ``dtype``."""
        self.set_m(m)
        if "x32" not in self._per_m:
            self._per_m["x32"] = torch.randn(m, self.shape.k, device=self.device,
                                             generator=self._gen)
        key = ("x", dtype)
        if key not in self._per_m:
            self._per_m[key] = self._per_m["x32"].to(dtype)
        return self._per_m[key]

    def expected(self, m: int, key, dtype: torch.dtype,
                 weight_fp32: Callable[[], torch.Tensor]) -> torch.Tensor:
        """fp32 x(m, dtype) @ W^T, W = weight_fp32() (cached per M under ``key``)."""
        self.set_m(m)
        full = ("expected", key, dtype)
        if full not in self._per_m:
            x = self.x(m, dtype).float()
            w = weight_fp32()
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False   # a true fp32 product
            try:
                self._per_m[full] = x @ w.t()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
            del w
        return self._per_m[full]

    def problem(self, m: int, bits: int, dtype: torch.dtype) -> registry.Problem:
        qw = self.quantized(bits)[0]
        x2d = self.x(m, dtype)
        return ops.make_problem(x2d, qw.qdata, qw.scales, qw.zero_points, qw.offsets, qw.g_idx,
                                qw.bits, qw.group_size)


def clone_qweight(qw: QuantizedWeight) -> QuantizedWeight:
    def c(t):
        return None if t is None else t.clone()
    return QuantizedWeight(qdata=c(qw.qdata), scales=c(qw.scales), zero_points=c(qw.zero_points),
                           offsets=c(qw.offsets), g_idx=c(qw.g_idx), bits=qw.bits,
                           group_size=qw.group_size, in_features=qw.in_features)


class Method:
    """One way to compute the layer; subclasses fill in the four methods below."""

    backend: str = ""             # the record's "backend" label
    family: str = ""              # "torch" | "dqgemm" | "gemlite"
    bits: int = 16
    dtype: torch.dtype = torch.float16

    def group_size(self, store: WeightStore) -> Optional[int]:
        return None if self.bits == 16 else store.quant.group_size(self.bits)

    def unsupported(self, store: WeightStore, m: int) -> Optional[str]:
        return None

    def kernel_name(self, store: WeightStore, m: int) -> str:
        return self.backend

    def calls(self, store: WeightStore, m: int) -> List[Call]:
        raise NotImplementedError

    def expected(self, store: WeightStore, m: int) -> torch.Tensor:
        raise NotImplementedError

    def floor_bytes(self, store: WeightStore, m: int) -> int:
        s = store.shape
        return roofline.case_bytes(m, s.k, s.n, self.bits, self.group_size(store))

    def __repr__(self) -> str:
        return f"<method {self.backend} int{self.bits} {registry.dtype_name(self.dtype)}>"


def expected_quantized(store: WeightStore, m: int, bits: int, dtype: torch.dtype):
    return store.expected(m, ("quantized", bits), dtype,
                          lambda: store.quantized(bits)[0].dequantize(torch.float32))


class OpMethod(Method):
    """dqgemm.matmul(x, qweight, backend=...) — the public API, dispatch included."""

    family = "dqgemm"

    def __init__(self, backend: str, bits: int, dtype: torch.dtype,
                 reference_max_kn: int, reference_max_m: int) -> None:
        self.backend = backend
        self.bits = bits
        self.dtype = dtype
        self.reference_max_kn = reference_max_kn
        self.reference_max_m = reference_max_m

    def selected(self, store: WeightStore, m: int) -> registry.Kernel:
        return ops.select_kernel(store.problem(m, self.bits, self.dtype), self.backend)

    def unsupported(self, store, m):
        try:
            kernel = self.selected(store, m)
        except ValueError as exc:
            # registry.select's message ends with each candidate's reason after "): "
            text = str(exc)
            return "no usable kernel: " + text.rsplit("): ", 1)[-1] if "): " in text else text
        if kernel.backend == "reference" and store.device.type == "cuda":
            s = store.shape
            if s.k * s.n > self.reference_max_kn or m > self.reference_max_m:
                return (f"reference kernel is slow (fp32 dequantize per call): timed on the "
                        f"GPU only for K*N <= {self.reference_max_kn} and M <= "
                        f"{self.reference_max_m} (--reference-max-kn/--reference-max-m)")
        return None

    def kernel_name(self, store, m):
        return self.selected(store, m).name

    def calls(self, store, m):
        x = store.x(m, self.dtype)
        backend = self.backend
        from ..ops import matmul
        return [(lambda qw=qw: matmul(x, qw, None, backend)) for qw in store.quantized(self.bits)]

    def expected(self, store, m):
        return expected_quantized(store, m, self.bits, self.dtype)


class KernelMethod(Method):
    """One registered kernel, called directly: prepare() per copy, then run()."""

    family = "dqgemm"

    def __init__(self, kernel: registry.Kernel, bits: int, dtype: torch.dtype,
                 timed_backends: Tuple[str, ...], reference_max_kn: int,
                 reference_max_m: int) -> None:
        self.kernel = kernel
        self.backend = f"kernel:{kernel.name}"
        self.bits = bits
        self.dtype = dtype
        self.timed_backends = timed_backends
        self.reference_max_kn = reference_max_kn
        self.reference_max_m = reference_max_m

    def unsupported(self, store, m):
        problem = store.problem(m, self.bits, self.dtype)
        reason = self.kernel.available() or self.kernel.supports(problem)
        if reason:
            return reason
        if self.kernel.backend in self.timed_backends:
            try:
                if ops.select_kernel(problem, self.kernel.backend) is self.kernel:
                    return (f"same as backend {self.kernel.backend!r} (its dispatch picks it; "
                            f"see that row)")
            except ValueError:
                pass
        if self.kernel.backend == "reference" and store.device.type == "cuda":
            s = store.shape
            if s.k * s.n > self.reference_max_kn or m > self.reference_max_m:
                return "reference kernel: too slow for this size on the GPU"
        return None

    def kernel_name(self, store, m):
        return self.kernel.name

    def calls(self, store, m):
        x = store.x(m, self.dtype)
        kernel = self.kernel
        qws = store.quantized(self.bits)
        prepared = store.derived(("prepared", kernel.name, self.bits),
                                 lambda: [kernel.prepare(qw) for qw in qws])
        spec = registry.WeightSpec(bits=self.bits, group_size=qws[0].group_size,
                                   in_features=qws[0].in_features,
                                   out_features=qws[0].out_features)
        return [(lambda p=p: kernel.run(x, p, None, spec)) for p in prepared]

    def expected(self, store, m):
        return expected_quantized(store, m, self.bits, self.dtype)


# ----------------------------------------------------------------------------------------
# Which methods a run times (--backends).
# ----------------------------------------------------------------------------------------

PEER_TOKENS = ("torch_fp16", "torch_bf16", "torch_int4", "gemlite")
ALIASES = {"fp16": "torch_fp16", "bf16": "torch_bf16", "tinygemm": "torch_int4"}


def backend_tokens(text: str) -> List[str]:
    """Expands --backends: 'all', 'peers', 'dqgemm', 'kernels', backend and kernel names."""
    kernel_names = [k.name for k in registry.all_kernels()]
    dq = ["auto", *registry.BACKENDS, "kernels"]
    out: List[str] = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        tok = ALIASES.get(raw, raw)
        if tok == "all":
            out += list(PEER_TOKENS) + dq
        elif tok == "peers":
            out += list(PEER_TOKENS)
        elif tok == "dqgemm":
            out += dq
        elif tok in PEER_TOKENS or tok in dq:
            out.append(tok)
        elif tok.startswith("kernel:") and tok[len("kernel:"):] in kernel_names:
            out.append(tok)
        elif tok in kernel_names:
            out.append("kernel:" + tok)
        else:
            raise ValueError(
                f"backends: expected a comma list of all, peers, dqgemm, kernels, "
                f"{', '.join(PEER_TOKENS + ('auto',) + registry.BACKENDS)} or a kernel name "
                f"({', '.join(kernel_names)}), got {raw!r}")
    if "torch_fp16" not in out:      # every speedup is relative to FP16 of the same run
        out.insert(0, "torch_fp16")
    seen = set()
    return [t for t in out if not (t in seen or seen.add(t))]


def build_methods(tokens: List[str], bits_list: List[int], dtype: torch.dtype,
                  reference_max_kn: int, reference_max_m: int) -> List[Method]:
    from . import peers

    methods: List[Method] = []
    if "torch_fp16" in tokens:
        methods.append(peers.DenseMethod(torch.float16))
    if "torch_bf16" in tokens:
        methods.append(peers.DenseMethod(torch.bfloat16))
    for bits in bits_list:
        if "torch_int4" in tokens and bits == 4:
            methods.append(peers.TorchInt4Method())
        if "gemlite" in tokens:
            methods.append(peers.GemliteMethod(bits, dtype))
        timed_backends = tuple(b for b in registry.BACKENDS if b in tokens)
        for backend in ("auto",) + registry.BACKENDS:
            if backend in tokens:
                methods.append(OpMethod(backend, bits, dtype, reference_max_kn, reference_max_m))
        for kernel in registry.all_kernels():
            if "kernels" in tokens or f"kernel:{kernel.name}" in tokens:
                methods.append(KernelMethod(kernel, bits, dtype, timed_backends,
                                            reference_max_kn, reference_max_m))
    return methods
