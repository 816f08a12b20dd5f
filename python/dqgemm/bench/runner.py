"""Runs the benchmark: for each shape, M and method, check once, then time.

For every (shape, M, method):
1. ``unsupported`` -> the case goes to the "skipped" list with the reason (never a result);
2. the method's first call runs once on a poisoned allocator (NaN-filled memory freed just
   before, so an unwritten output element shows as NaN) and is compared with the fp32
   product of the weight it claims to compute: relative Frobenius error <= 2e-3 (fp16) or
   1e-2 (bf16), and finite. A wrong result is recorded with ok=False and is NOT timed;
3. timing.time_calls gives the kernel-only (graph) and eager times;
4. after all cases: floor, percentage of floor and speedup over torch_fp16 of the same
   (shape, M) are filled in.
A CUDA error that poisons the context (illegal address...) stops the run; what was
measured until then is kept, the rest is listed as not run, and the kernel that broke it
is named in "aborted_by". ``--resume PATH`` continues such a run in a fresh process: cases
already in the document are kept, cases served by a kernel in "aborted_by" (directly or
through dispatch) are skipped with that reason, the ceilings measured before are reused
(bench/gpu_check.sh does this).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

from .. import __version__, _ext, registry
from . import peers, roofline, timing
from .cases import Method, QuantSettings, WeightStore, build_methods
from .shapes import Shape

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
SCHEMA = "dqgemm-bench-v1"


@dataclasses.dataclass
class Settings:
    shapes: List[Shape]
    ms: List[int]
    bits: List[int]
    dtype: torch.dtype
    quant: QuantSettings
    backends: List[str]                 # expanded tokens (cases.backend_tokens)
    device: torch.device
    reps: int = timing.MIN_REPS
    warmup: int = 3
    rotate: bool = True
    graphs: bool = True
    reference_max_kn: int = 4096 * 4096
    reference_max_m: int = 1024
    progress: bool = True
    command: str = ""
    time_budget_s: Optional[float] = None   # stop timing new cases after this many seconds
    resume: Optional[Dict] = None       # a document of an aborted run to continue


def device_facts(device: torch.device) -> Dict:
    if device.type != "cuda":
        return {"type": device.type, "name": platform.processor() or platform.machine(),
                "cpu_threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": props.name, "arch": f"sm_{props.major}{props.minor}",
            "sms": props.multi_processor_count, "l2_bytes": timing.l2_bytes(device),
            "memory_bytes": props.total_memory}


def versions() -> Dict:
    out = {"dqgemm": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "extension": "built" if _ext.extension() is not None else _ext.extension_error()}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "not installed"
    out.update(peers.peer_versions())
    return out


def _poison(device: torch.device, m: int, n: int, dtype: torch.dtype) -> None:
    if device.type == "cuda":
        torch.full((m, n), float("nan"), dtype=dtype, device=device)  # freed at once


def _rel_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (out.float() - expected).norm().item()
    ref = expected.norm().item()
    return diff / (ref if ref > 0 else 1.0)


def _context_broken(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        torch.cuda.synchronize(device)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:240]}"


def _banned_kernel(method: Method, store: WeightStore, m: int, banned: List[str]
                   ) -> Optional[str]:
    if not banned:
        return None
    try:
        name = method.kernel_name(store, m)
    except Exception:       # no kernel for this problem: unsupported() will say why
        return None
    return name if name in banned or method.backend in banned else None


def new_record(store: WeightStore, method: Method, m: int, rf: Optional[roofline.Roofline]
               ) -> Dict:
    s = store.shape
    nbytes = method.floor_bytes(store, m)
    flops = roofline.case_flops(m, s.k, s.n)
    return {
        "shape": [s.k, s.n], "shape_name": s.name, "M": m, "bits": method.bits,
        "group_size": method.group_size(store), "dtype": registry.dtype_name(method.dtype),
        "backend": method.backend, "family": method.family, "kernel": None,
        "us": None, "eager_us": None,
        "floor_us": rf.floor_us(flops, nbytes) if rf else None,
        "pct_of_floor": None, "speedup_vs_fp16": None, "ok": False,
        "rel_error": None, "tolerance": TOLERANCE[method.dtype], "timer": None,
        "copies": None, "reps": None, "spread_pct": None, "bytes": nbytes, "flops": flops,
        "note": "",
    }


def run_case(store: WeightStore, method: Method, m: int, settings: Settings,
             rf: Optional[roofline.Roofline]) -> Dict:
    rec = new_record(store, method, m, rf)
    rec["kernel"] = method.kernel_name(store, m)
    calls = method.calls(store, m)
    _poison(store.device, m, store.shape.n, method.dtype)
    out = calls[0]()
    timing.synchronize(store.device)
    expected = method.expected(store, m)
    if tuple(out.shape) != tuple(expected.shape) or out.dtype != method.dtype:
        rec["note"] = (f"wrong output: expected {tuple(expected.shape)} {method.dtype}, got "
                       f"{tuple(out.shape)} {out.dtype}")
        return rec
    finite = bool(torch.isfinite(out).all().item())
    rec["rel_error"] = _rel_error(out, expected)
    del out
    if not finite or not rec["rel_error"] <= rec["tolerance"]:
        rec["note"] = ("output holds NaN/Inf (unwritten or overflow)" if not finite else
                       f"relative error {rec['rel_error']:.2e} > {rec['tolerance']:.0e}")
        return rec
    rec["ok"] = True
    t = timing.time_calls(calls, store.device, reps=settings.reps, warmup=settings.warmup,
                          graph=settings.graphs)
    rec.update(us=t.us, eager_us=t.eager_us, timer=t.timer, copies=t.copies, reps=t.reps,
               spread_pct=t.spread_pct)
    if t.note:
        rec["note"] = t.note
    return rec


def finish(records: List[Dict]) -> None:
    """Fills pct_of_floor and speedup_vs_fp16 (torch_fp16 of the same shape and M)."""
    fp16 = {(tuple(r["shape"]), r["M"]): r["us"] for r in records
            if r["backend"] == "torch_fp16" and r["ok"] and r["us"]}
    for r in records:
        if not r["ok"] or not r["us"]:
            continue
        if r["floor_us"]:
            r["pct_of_floor"] = 100.0 * r["floor_us"] / r["us"]
        base = fp16.get((tuple(r["shape"]), r["M"]))
        if base:
            r["speedup_vs_fp16"] = base / r["us"]


def run(settings: Settings, rf: Optional[roofline.Roofline] = None) -> Dict:
    device = settings.device
    started = datetime.datetime.now(datetime.timezone.utc)
    doc: Dict = {
        "schema": SCHEMA, "created_utc": started.isoformat(timespec="seconds"),
        "command": settings.command, "device": device_facts(device), "versions": versions(),
        "settings": {
            "shapes": [[s.k, s.n] for s in settings.shapes], "M": list(settings.ms),
            "bits": list(settings.bits), "dtype": registry.dtype_name(settings.dtype),
            "group_size_int4": settings.quant.group_size_int4,
            "group_size_int8": settings.quant.group_size_int8,
            "scale_dtype": registry.dtype_name(settings.quant.scale_dtype),
            "backends": list(settings.backends), "reps": settings.reps,
            "warmup": settings.warmup, "rotate_l2": settings.rotate, "graphs": settings.graphs,
            "rotation_factor": timing.ROTATION_FACTOR,
            "reference_max_kn": settings.reference_max_kn,
            "reference_max_m": settings.reference_max_m,
        },
        "method": ("kernel-only us: median of >= 15 CUDA graph replays / copies per replay, "
                   "after warm-up; weight copies rotate through >= 3x L2 (cold L2); eager_us: "
                   "the same calls without a graph; each case checked once against an fp32 "
                   "product before timing, a wrong result is ok=false and not timed"),
        "kernels": {k.name: {"backend": k.backend, "priority": k.priority,
                             "available": k.available() or "yes"}
                    for k in registry.all_kernels()},
        "results": [], "skipped": [], "not_run": [], "e2e": [],
    }
    prev = settings.resume
    done = set()
    banned: List[str] = []
    if prev:
        doc["created_utc"] = prev.get("created_utc", doc["created_utc"])
        doc["results"] = list(prev.get("results", []))
        doc["skipped"] = list(prev.get("skipped", []))
        doc["aborts"] = list(prev.get("aborts", []))
        banned = list(prev.get("aborted_by", []))
        if banned:
            doc["aborted_by"] = banned
        done = {(tuple(r["shape"]), r["M"], r["backend"], r["bits"])
                for r in doc["results"] + doc["skipped"]}
        if rf is None and prev.get("roofline"):
            rf = roofline.Roofline(**prev["roofline"])
    if rf is None:
        rf = roofline.measure(device)
    doc["bandwidth_gb_s"] = rf.bandwidth_gb_s
    doc["peak_tflop_s"] = rf.peak_tflop_s
    doc["roofline"] = dataclasses.asdict(rf)

    methods = build_methods(settings.backends, settings.bits, settings.dtype,
                            settings.reference_max_kn, settings.reference_max_m)
    total = len(settings.shapes) * len(settings.ms) * len(methods)
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="bench", unit="case", file=sys.stderr,
                   disable=not settings.progress, dynamic_ncols=True, mininterval=0.5)
    except ImportError:  # tqdm is a dependency, but never fail a benchmark over a bar
        bar = None
    broken: Optional[str] = None
    stopped: Optional[str] = None            # time budget spent: the rest is not_run
    deadline = (time.monotonic() + settings.time_budget_s
                if settings.time_budget_s else None)
    for shape in settings.shapes:
        store = None
        try:
            if not broken:
                try:
                    store = WeightStore(shape, device, settings.quant,
                                        seed=shape.k * 7 + shape.n, rotate=settings.rotate)
                except Exception as exc:
                    broken = _context_broken(device)
                    doc.setdefault("errors", []).append(
                        f"{shape}: building the weights failed: {_short(exc)}")
                    if not broken:
                        if bar is not None:
                            bar.update(len(settings.ms) * len(methods))
                        continue
            for m in settings.ms:
                for method in methods:
                    label = f"{shape} M={m} {method.backend}" + (
                        f" int{method.bits}" if method.bits != 16 else "")
                    if bar is not None:
                        bar.set_postfix_str(label, refresh=False)
                        bar.update(1)
                    if deadline is not None and not stopped and time.monotonic() > deadline:
                        stopped = f"time budget of {settings.time_budget_s:.0f} s used up"
                        doc["stopped"] = stopped
                    if broken or stopped:
                        doc["not_run"].append({"shape": [shape.k, shape.n], "M": m,
                                               "backend": method.backend, "bits": method.bits})
                        continue
                    if ((shape.k, shape.n), m, method.backend, method.bits) in done:
                        continue
                    culprit = _banned_kernel(method, store, m, banned)
                    if culprit:
                        doc["skipped"].append({
                            "shape": [shape.k, shape.n], "M": m, "bits": method.bits,
                            "backend": method.backend,
                            "reason": f"not run: kernel {culprit!r} broke the CUDA context "
                                      f"earlier in this run (see 'aborts')"})
                        continue
                    try:
                        reason = method.unsupported(store, m)
                    except Exception as exc:
                        reason = f"support check failed: {_short(exc)}"
                    if reason:
                        doc["skipped"].append({"shape": [shape.k, shape.n], "M": m,
                                               "bits": method.bits, "backend": method.backend,
                                               "reason": reason})
                        continue
                    try:
                        rec = run_case(store, method, m, settings, rf)
                    except Exception as exc:
                        rec = new_record(store, method, m, rf)
                        rec["note"] = f"error: {_short(exc)}"
                        try:
                            rec["kernel"] = method.kernel_name(store, m)
                        except Exception:
                            pass
                        if isinstance(exc, torch.cuda.OutOfMemoryError):
                            gc.collect()
                            torch.cuda.empty_cache()
                        broken = _context_broken(device)
                        if broken:
                            rec["note"] += f" (CUDA context broken; run stopped: {broken})"
                            doc.setdefault("aborts", []).append(
                                {"shape": [shape.k, shape.n], "M": m, "bits": method.bits,
                                 "backend": method.backend, "error": rec["note"]})
                            doc["aborted_by"] = banned + [rec["kernel"] or method.backend]
                    doc["results"].append(rec)
        finally:
            del store
            gc.collect()
            if device.type == "cuda" and not broken:
                try:
                    torch.cuda.empty_cache()
                except Exception as exc:   # an asynchronous error surfacing here
                    broken = _short(exc)
    if bar is not None:
        bar.close()
    finish(doc["results"])
    doc["elapsed_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    if broken:
        doc["aborted"] = broken
    return doc
