"""End-to-end decode speed: tokens/s of a Llama-shaped transformer with random weights.

``run_decode_benchmark(model="llama3-8b", batch_sizes=(1, 8, 32), ...)`` builds the model
once per variant (fp16: nn.Linear; int4/int8: dqgemm.QuantLinear with the given backend),
fills a static KV cache with random keys/values for ``context`` positions, captures ONE
decode step in a CUDA graph (embedding -> layers -> final norm -> lm_head -> greedy next
token, which is written back as the next step's input, position advanced inside the graph)
and times ``steps`` replays with CUDA events. ms_per_token is the time of one decode step
(every sequence of the batch gets one token); tokens_per_s = batch * 1000 / ms_per_token.

The model (Llama 3 layout): RMSNorm, fused QKV projection, RoPE, grouped-query attention
over the static cache (positions 0..current), output projection, SwiGLU MLP with a fused
gate+up projection. The work between a layer's matmuls (residual add + RMSNorm, RoPE +
KV-cache write, attention, SiLU * up) runs as fused Triton kernels on CUDA
(``elementwise="triton"``, see e2e_ops; attention is a flash-decoding kernel that splits
the cache across programs and reads the position on the device) or as plain torch ops
(``"torch"``, the CPU default; attention is torch's scaled_dot_product_attention over the
whole cache with a boolean mask of the positions after the current one), the same for FP16
and the quantized variants. Each record names which (``elementwise``, and ``attention``:
records written before the Triton attention existed ran SDPA with either setting).
On compute capability 9.0+ the step runs within dqgemm.programmatic_launch()
(``programmatic_launch``, recorded): dqgemm's decode kernels and the fused Triton ops are
programmatic dependent launches, so each of these short, dependent kernels launches while
the one before it finishes (a decode matmul also fetches its first weight stages then); the
FP16 variant's cuBLAS kernels are launched normally, as torch launches them.
All linear layers of the decoder are quantized in the int4/int8 variants; the embedding and
lm_head stay fp16 (as in common INT4 deployments). Weights are random (std 0.02), so the
speed is real and the text is not. ``layers`` may be lowered to fit memory or time; the
record states the layer count used and nothing is extrapolated.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import launch, ops, registry
from ..nn import QuantLinear
from ..quantize import quantize
from . import e2e_ops, timing


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    n_layers: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5


MODELS: Dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig("llama3-8b", 4096, 14336, 32, 8, 128, 128256, 32),
    "llama3-70b": ModelConfig("llama3-70b", 8192, 28672, 64, 8, 128, 128256, 80),
    # a toy for CPU tests and CI: same structure, tiny sizes
    "tiny": ModelConfig("tiny", 256, 512, 4, 2, 64, 1000, 2),
}

VARIANTS = {"fp16": None, "int4": 4, "int8": 8}

# what computes attention with each elementwise setting (the records' "attention" field)
_ATTENTION = {"triton": "triton flash-decoding", "torch": "torch sdpa + mask"}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device, dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim, device=device).to(dtype),
                                   requires_grad=False)

    def forward(self, x, residual=None, impl: str = "torch"):
        """(h, y): the residual stream h = x + residual and y = rmsnorm(h) * weight."""
        return e2e_ops.add_rmsnorm(x, residual, self.weight, self.eps, impl)


def _linear(in_f: int, out_f: int, bits: Optional[int], group_size: int, backend: str,
            device, dtype) -> nn.Module:
    weight = torch.randn(out_f, in_f, device=device, dtype=torch.float32).mul_(0.02)
    if bits is None:
        layer = nn.Linear(in_f, out_f, bias=False, device="meta")
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        return layer
    gs = group_size if bits == 4 else -1
    qw = quantize(weight, bits=bits, group_size=gs, symmetric=True, scale_dtype=torch.float16)
    return QuantLinear.from_quantized(qw, None, backend=backend)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, bits, group_size, backend, device, dtype) -> None:
        super().__init__()
        self.cfg = cfg
        d, h, kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, device, dtype)
        self.qkv = _linear(cfg.hidden, (h + 2 * kv) * d, bits, group_size, backend, device, dtype)
        self.o = _linear(h * d, cfg.hidden, bits, group_size, backend, device, dtype)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, device, dtype)
        self.gate_up = _linear(cfg.hidden, 2 * cfg.intermediate, bits, group_size, backend,
                               device, dtype)
        self.down = _linear(cfg.intermediate, cfg.hidden, bits, group_size, backend, device,
                            dtype)

    def forward(self, x, residual, pos, cos, sin, k_cache, v_cache, mask, impl="torch"):
        """(out, residual): the layer's output and the residual stream before it is added
        (the add is fused into the next norm, see e2e_ops.add_rmsnorm).

        mask: the attention mask of the "torch" impl ([1, 1, 1, S], True at 0..pos, built
        once per step for all layers); None with "triton", whose kernel reads pos itself."""
        cfg = self.cfg
        b = x.shape[0]
        d, h, kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        residual, xn = self.attn_norm(x, residual, impl)
        qkv = self.qkv(xn)                                        # [B, 1, (h+2kv)*d]
        q = e2e_ops.rope_to_cache(qkv, cos, sin, pos, k_cache, v_cache, h, kv, impl)
        att = e2e_ops.decode_attention(q, k_cache, v_cache, pos, impl, mask)  # [B, h, d]
        residual, xn = self.mlp_norm(self.o(att.reshape(b, 1, h * d)), residual, impl)
        return self.down(e2e_ops.silu_mul(self.gate_up(xn), impl)), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, n_layers: int, bits, group_size, backend, device,
                 dtype, progress=None, elementwise: Optional[str] = None,
                 programmatic_launch: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        # the elementwise ops' implementation (e2e_ops): fused Triton kernels on CUDA
        self.elementwise = elementwise or e2e_ops.default_impl(torch.device(device))
        e2e_ops.check_impl(self.elementwise, torch.device(device))
        # step() runs within dqgemm.programmatic_launch(programmatic_launch)
        self.programmatic_launch = bool(programmatic_launch)
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden, device=device, dtype=dtype)
        with torch.no_grad():
            self.embed.weight.normal_(0, 1.0)
        self.embed.weight.requires_grad_(False)
        blocks = []
        for _ in range(n_layers):
            blocks.append(Block(cfg, bits, group_size, backend, device, dtype))
            if progress is not None:
                progress()
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, device, dtype)
        self.lm_head = _linear(cfg.hidden, cfg.vocab, None, group_size, backend, device, dtype)
        half = cfg.head_dim // 2
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(half, device=device).float() / half))
        self.inv_freq = inv

    def rope_tables(self, cache_len: int):
        t = torch.arange(cache_len, device=self.inv_freq.device).float()
        ang = torch.outer(t, self.inv_freq)                       # [S, d/2]
        return ang.cos(), ang.sin()

    def step(self, state: "DecodeState") -> None:
        """One decode step for every sequence; writes the greedy next token into state."""
        with launch.programmatic_launch(self.programmatic_launch):
            self._step(state)

    def _step(self, state: "DecodeState") -> None:
        pos = state.pos
        cos = state.cos.index_select(0, pos).to(state.dtype)     # [1, d/2], broadcasts
        sin = state.sin.index_select(0, pos).to(state.dtype)
        # only SDPA needs a mask; the Triton attention reads pos on the device
        mask = ((state.arange <= pos).view(1, 1, 1, -1) if self.elementwise == "torch"
                else None)
        x = self.embed(state.tokens)                              # [B, 1, hidden]
        residual = None
        for layer, kc, vc in zip(self.layers, state.k_caches, state.v_caches):
            x, residual = layer(x, residual, pos, cos, sin, kc, vc, mask, self.elementwise)
        logits = self.lm_head(self.norm(x, residual, self.elementwise)[1])  # [B, 1, vocab]
        state.logits.copy_(logits)
        state.tokens.copy_(logits.argmax(dim=-1))
        pos.add_(1)


@dataclasses.dataclass
class DecodeState:
    tokens: torch.Tensor        # [B, 1] int64
    pos: torch.Tensor           # [1] int64, the position being written
    arange: torch.Tensor        # [S]
    cos: torch.Tensor
    sin: torch.Tensor
    k_caches: List[torch.Tensor]
    v_caches: List[torch.Tensor]
    logits: torch.Tensor
    dtype: torch.dtype


def _new_state(model: DecoderModel, batch: int, cache_len: int, context: int, device,
               dtype) -> DecodeState:
    cfg = model.cfg
    gen = torch.Generator(device=device).manual_seed(batch)
    shape = (batch, cfg.n_kv_heads, cache_len, cfg.head_dim)
    k_caches = [torch.randn(shape, device=device, generator=gen).to(dtype)
                for _ in model.layers]
    v_caches = [torch.randn(shape, device=device, generator=gen).to(dtype)
                for _ in model.layers]
    cos, sin = model.rope_tables(cache_len)
    return DecodeState(
        tokens=torch.randint(0, cfg.vocab, (batch, 1), device=device, generator=gen),
        pos=torch.tensor([context], device=device, dtype=torch.int64),
        arange=torch.arange(cache_len, device=device), cos=cos, sin=sin,
        k_caches=k_caches, v_caches=v_caches,
        logits=torch.empty(batch, 1, cfg.vocab, device=device, dtype=dtype), dtype=dtype)


def _weight_bytes(model: nn.Module) -> int:
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.weight_nbytes
        elif isinstance(mod, (nn.Linear, nn.Embedding)):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def _kernel_for(model: DecoderModel, batch: int, backend: str, bits: Optional[int],
                device) -> str:
    if bits is None:
        return "cublas" if torch.device(device).type == "cuda" else "aten"
    layer = model.layers[0].gate_up
    x = torch.empty(batch, layer.in_features, device=device, dtype=torch.float16)
    problem = ops.make_problem(x, layer.qdata, layer.scales, layer.zero_points, layer.offsets,
                               layer.g_idx, layer.bits, layer.group_size)
    return ops.select_kernel(problem, backend).name


def usable_backends(bits: int, device, include_reference: bool = False) -> List[str]:
    """Backends with a kernel for this bit width's decode problem on ``device``."""
    dev = torch.device(device)
    name, arch = ops._device_facts(dev) if dev.type == "cuda" else ("", (0, 0))
    out = []
    for backend in registry.BACKENDS:
        if backend == "reference" and not include_reference:
            continue
        problem = registry.Problem(m=1, n=4096, k=4096, bits=bits,
                                   group_size=128 if bits == 4 else -1, dtype=torch.float16,
                                   scale_dtype=torch.float16, zero_mode="symmetric",
                                   act_order=False, device_type=dev.type, device_name=name,
                                   arch=arch)
        if any(reason is None for _, reason in registry.candidates(problem, backend)):
            out.append(backend)
    return out


def capture_step(model: DecoderModel, state: DecodeState, dev: torch.device
                 ) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of one decode step, captured after a warm-up step on a side stream
    (which advances state like any step). Call under torch.no_grad()."""
    return timing.capture_graph(lambda: model.step(state), dev)


def _time_steps(model: DecoderModel, state: DecodeState, steps: int, warmup: int,
                context: int, device, use_graph: bool) -> List[float]:
    """Per-step milliseconds of ``steps`` decode steps (graph replays on CUDA)."""
    dev = torch.device(device)
    with torch.no_grad():
        for _ in range(2):                       # eager warm-up: JIT, prepared weights
            model.step(state)
        if dev.type != "cuda":
            state.pos.fill_(context)
            samples = []
            for _ in range(steps):
                t0 = time.perf_counter()
                model.step(state)
                samples.append(1e3 * (time.perf_counter() - t0))
            return samples
        torch.cuda.synchronize(dev)
        run = lambda: model.step(state)  # noqa: E731
        if use_graph:
            run = capture_step(model, state, dev).replay
        for _ in range(warmup):
            run()
        state.pos.fill_(context)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        for s, e in zip(starts, ends):
            s.record()
            run()
            e.record()
        torch.cuda.synchronize(dev)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def run_decode_benchmark(model: str = "llama3-8b", batch_sizes: Sequence[int] = (1, 8, 32),
                         variants: Sequence[str] = ("fp16", "int4", "int8"),
                         backend: str = "auto", device: str = "cuda", progress: bool = True,
                         layers: Optional[int] = None, context: int = 256, steps: int = 32,
                         warmup: int = 3, group_size: int = 128,
                         use_graph: bool = True,
                         elementwise: Optional[str] = None,
                         programmatic_launch: Optional[bool] = None) -> List[Dict]:
    """Decode tokens/s of a Llama-shaped model with random weights (see module docstring).

    Args:
        model: a key of MODELS ("llama3-8b", "llama3-70b", "tiny").
        batch_sizes: sequences decoded together.
        variants: "fp16", "int4" (group ``group_size``), "int8" (per output channel).
        backend: dqgemm backend of the quantized variants: "auto", "reference", "triton",
            "cuda", a comma list of them, or "all" (every backend with a usable kernel
            here, reference excluded).
        device: "cuda" or "cpu" (CPU: eager steps, wall clock; for tests).
        layers: decoder layers to build (default: the model's own count).
        context: positions already in the KV cache when timing starts; the cache holds
            context + warmup + steps positions (rounded up to 64); each step attends the
            positions up to its own.
        elementwise: "triton" (fused kernels, the default on CUDA) or "torch" (plain torch
            ops, the default elsewhere) for the norms, residual adds, RoPE, KV-cache writes,
            attention and SiLU (dqgemm.bench.e2e_ops); the same for every variant.
        programmatic_launch: run each step within dqgemm.programmatic_launch() (see the
            module docstring); default: on CUDA devices of compute capability 9.0+ with the
            Triton ops. True elsewhere is an error.

    Returns:
        One dict per (variant, backend, batch): model, layers, variant, backend, kernel,
        batch, tokens_per_s, ms_per_token, speedup_vs_fp16, weight_bytes, context,
        cache_len, steps, graph, elementwise, attention, programmatic_launch, ok, note.
    """
    if model not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {model!r}")
    cfg = MODELS[model]
    n_layers = cfg.n_layers if layers is None else int(layers)
    if n_layers <= 0:
        raise ValueError(f"layers: expected a positive integer, got {layers!r}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variants: expected items of {sorted(VARIANTS)}, got {v!r}")
    if not batch_sizes or any(int(b) <= 0 for b in batch_sizes):
        raise ValueError(f"batch_sizes: expected positive integers, got {batch_sizes!r}")
    dev = torch.device(device)
    elementwise = elementwise or e2e_ops.default_impl(dev)
    e2e_ops.check_impl(elementwise, dev)
    programmatic_launch = _programmatic_default(programmatic_launch, dev, elementwise)
    dtype = torch.float16
    cache_len = int(math.ceil((context + warmup + steps + 3) / 64.0) * 64)
    graph = use_graph and dev.type == "cuda"

    plan = []
    for v in variants:
        bits = VARIANTS[v]
        if bits is None:
            plan.append((v, "torch", None))
            continue
        if backend == "all":
            names = usable_backends(bits, dev)
        else:
            names = [b.strip() for b in backend.split(",") if b.strip()]
            for b in names:
                ops.check_backend(b)
        plan += [(v, b, bits) for b in names]

    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(plan) * (n_layers + len(batch_sizes)), desc=f"e2e {model}",
                       unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        except ImportError:
            bar = None
    tick = (lambda: bar.update(1)) if bar is not None else None

    results: List[Dict] = []
    broken: Optional[str] = None
    for variant, be, bits in plan:
        base = {"model": model, "layers": n_layers, "variant": variant, "backend": be,
                "bits": bits or 16, "group_size": (group_size if bits == 4 else
                                                   -1 if bits == 8 else None),
                "context": context, "cache_len": cache_len, "steps": steps, "graph": graph,
                "elementwise": elementwise, "attention": _ATTENTION[elementwise],
                "programmatic_launch": programmatic_launch,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
        net = None
        if broken:
            results += [dict(base, batch=int(b), tokens_per_s=None, ms_per_token=None,
                             ok=False, note=f"not run: CUDA context broken earlier ({broken})")
                        for b in batch_sizes]
            continue
        try:
            if bar is not None:
                bar.set_postfix_str(f"building {variant}/{be}", refresh=False)
            torch.manual_seed(0)
            net = DecoderModel(cfg, n_layers, bits, group_size, be if bits else "auto", dev,
                               dtype, progress=tick, elementwise=elementwise,
                               programmatic_launch=programmatic_launch).eval()
            wbytes = _weight_bytes(net)
        except Exception as exc:
            for b in batch_sizes:
                results.append(dict(base, batch=int(b), tokens_per_s=None, ms_per_token=None,
                                    ok=False, note=f"build failed: {type(exc).__name__}: "
                                    f"{str(exc)[:200]}"))
            net = None
            broken = _free(dev)
            continue
        for b in batch_sizes:
            b = int(b)
            rec = dict(base, batch=b, weight_bytes=wbytes, tokens_per_s=None,
                       ms_per_token=None, ok=False, note="")
            state = None
            try:
                if bar is not None:
                    bar.set_postfix_str(f"{variant}/{be} batch {b}", refresh=False)
                rec["kernel"] = _kernel_for(net, b, be, bits, dev)
                state = _new_state(net, b, cache_len, context, dev, dtype)
                samples = _time_steps(net, state, steps, warmup, context, dev, graph)
                ms = statistics.median(samples)
                finite = bool(torch.isfinite(state.logits).all().item())
                rec.update(ms_per_token=ms, tokens_per_s=b * 1000.0 / ms, ok=finite,
                           ms_mean=sum(samples) / len(samples))
                if not finite:
                    rec["note"] = "logits hold NaN/Inf"
            except Exception as exc:
                rec["note"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                state = None
                broken = _free(dev)
            results.append(rec)
            del state
            if tick:
                tick()
            if broken:
                rec["note"] += " (CUDA context broken: the rest of the run is not run)"
                break
        done = {r["batch"] for r in results if r["variant"] == variant and r["backend"] == be}
        results += [dict(base, batch=int(b), tokens_per_s=None, ms_per_token=None, ok=False,
                         note=f"not run: CUDA context broken ({broken})")
                    for b in batch_sizes if int(b) not in done]
        net = None
        broken = broken or _free(dev)
    if bar is not None:
        bar.close()
    return add_speedups(results)


def _programmatic_default(value: Optional[bool], dev: torch.device, elementwise: str) -> bool:
    """run_decode_benchmark's programmatic_launch: checked, or its default."""
    capable = (dev.type == "cuda" and elementwise == "triton"
               and ops._device_facts(dev)[1] >= (9, 0))
    if value is None:
        return capable
    if not isinstance(value, bool):
        raise TypeError(f"programmatic_launch: expected a bool or None, got {value!r}")
    if value and not capable:
        raise ValueError(f"programmatic_launch: needs a CUDA device of compute capability "
                         f"9.0+ and the Triton ops, got {dev} with elementwise="
                         f"{elementwise!r}")
    return value


def add_speedups(results: List[Dict]) -> List[Dict]:
    """speedup_vs_fp16 = fp16's ms/token over each row's, per (model, layers, batch,
    elementwise ops, attention, programmatic launch).

    Also merges lists from several processes (bench/gpu_check.sh runs each backend in its
    own process, so one backend's CUDA error cannot take the others' rows with it)."""
    def key(r):
        return (r["model"], r["layers"], r["batch"], r.get("elementwise"), r.get("attention"),
                r.get("programmatic_launch", False))
    fp16 = {key(r): r["ms_per_token"] for r in results if r["variant"] == "fp16" and r["ok"]}
    for r in results:
        base_ms = fp16.get(key(r))
        r["speedup_vs_fp16"] = (base_ms / r["ms_per_token"]
                                if base_ms and r["ok"] and r["ms_per_token"] else None)
    return results


def _free(dev: torch.device) -> Optional[str]:
    """Frees memory; returns why the CUDA context is unusable, or None."""
    gc.collect()
    if dev.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.zeros(1, device=dev).add_(1).item()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
    return None


def format_results(results: List[Dict]) -> str:
    """The rows as a table, after one line per distinct set of step settings (the ops
    between the matmuls, attention, programmatic launch), which every row shares in a
    normal run."""
    settings = sorted({(r.get("elementwise"), r.get("attention"), r.get("programmatic_launch"))
                       for r in results}, key=str)
    lines = [f"step: elementwise ops {e}, attention {a}, programmatic launch "
             f"{'on' if p else 'off'}" for e, a, p in settings]
    lines += [f"{'model':<11} {'layers':>6} {'variant':<7} {'backend':<9} {'kernel':<22} "
             f"{'batch':>5} {'ms/token':>9} {'tokens/s':>10} {'x fp16':>7}  note"]
    for r in results:
        ms = f"{r['ms_per_token']:.3f}" if r.get("ms_per_token") else "-"
        tps = f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "-"
        sp = f"{r['speedup_vs_fp16']:.2f}" if r.get("speedup_vs_fp16") else "-"
        lines.append(f"{r['model']:<11} {r['layers']:>6} {r['variant']:<7} {r['backend']:<9} "
                     f"{str(r.get('kernel') or '-'):<22} {r['batch']:>5} {ms:>9} {tps:>10} "
                     f"{sp:>7}  {r.get('note', '')}")
    return "\n".join(lines)
