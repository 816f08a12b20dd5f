"""Readable tables from a benchmark document (the dict runner.run returns / --json holds).

full_table: every record, grouped by shape and M (us, eager us, floor, % of floor, x FP16).
summary_table: one line per (shape, M): FP16, dqgemm INT4/INT8 ("auto" and the best
dqgemm row), torch's INT4 kernel, and on an H100 the FP16 anchor of anchors.md.
"""

from __future__ import annotations

import collections
from typing import Dict, Iterable, List, Optional

# FP16 cuBLAS microseconds measured on an H100 80GB HBM3 (the team's
# shared/notes/anchors.md, 2026-11-23, same method): (K, N, M) -> us.
ANCHOR_FP16_H100 = {
    (4096, 4096, 1): 15.9, (4096, 4096, 16): 17.0, (4096, 4096, 64): 15.3,
    (4096, 4096, 256): 18.9, (4096, 4096, 4096): 205.7,
    (4096, 14336, 1): 43.9, (4096, 14336, 16): 43.6, (4096, 14336, 64): 45.2,
    (4096, 14336, 1024): 169.5,
    (14336, 4096, 1): 45.5, (14336, 4096, 16): 47.1, (14336, 4096, 4096): 1356.4,
    (8192, 28672, 1): 193.4, (8192, 28672, 16): 166.1, (8192, 28672, 64): 174.6,
    (8192, 28672, 256): 213.3, (8192, 28672, 1024): 660.1, (8192, 28672, 4096): 4226.7,
    (28672, 8192, 1): 168.7, (28672, 8192, 16): 169.9, (28672, 8192, 64): 176.2,
    (28672, 8192, 1024): 643.2, (28672, 8192, 4096): 3232.3,
}


SAME_AS_BACKEND = "same as backend"   # a kernel row left out because its backend row is it


def _f(v: Optional[float], fmt: str = "{:.1f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def weight_label(r: Dict) -> str:
    if r["bits"] == 16:
        return r["dtype"]
    gs = r["group_size"]
    return f"int{r['bits']} " + ("pc" if gs in (-1, None) else f"g{gs}")


def _by_shape_m(records: Iterable[Dict]):
    groups = collections.OrderedDict()
    for r in records:
        groups.setdefault((tuple(r["shape"]), r["M"]), []).append(r)
    return groups


def _bw(gb_s: float) -> str:
    return f"{gb_s / 1e3:.2f} TB/s" if gb_s >= 100 else f"{gb_s:.1f} GB/s"


def _tflops(t: float) -> str:
    return f"{t:.0f} TFLOP/s" if t >= 10 else f"{t * 1e3:.1f} GFLOP/s"


def header(doc: Dict) -> str:
    dev = doc.get("device", {})
    ver = doc.get("versions", {})
    s = doc.get("settings", {})
    return (f"device: {dev.get('name')} ({dev.get('arch', dev.get('type'))}); torch "
            f"{ver.get('torch')}, triton {ver.get('triton')}, dqgemm {ver.get('dqgemm')}, "
            f"extension {ver.get('extension')}\n"
            f"measured: copy {_bw(doc.get('bandwidth_gb_s', 0))} (read+write), "
            f"{doc.get('roofline', {}).get('peak_dtype', 'fp16')} matmul "
            f"{_tflops(doc.get('peak_tflop_s', 0))}; activations {s.get('dtype')}, INT4 "
            f"g{s.get('group_size_int4')}, INT8 g{s.get('group_size_int8')} (-1 = per channel)"
            f"; median of {s.get('reps')} reps")


def full_table(doc: Dict) -> str:
    lines = [header(doc), ""]
    cols = (f"{'M':>5}  {'backend':<22} {'kernel':<28} {'weight':<9} {'us':>9} "
            f"{'eager_us':>9} {'floor':>8} {'%floor':>6} {'xFP16':>6}  ok")
    last_shape = None
    for (shape, m), recs in _by_shape_m(doc["results"]).items():
        if shape != last_shape:
            name = recs[0].get("shape_name") or ""
            lines += ["", f"== K={shape[0]} N={shape[1]} {name}".rstrip(), cols]
            last_shape = shape
        for r in recs:
            ok = "ok" if r["ok"] else f"NOT OK: {r['note']}"
            if r["ok"] and r.get("note"):
                ok += f" ({r['note']})"
            lines.append(
                f"{m:>5}  {r['backend']:<22} {str(r['kernel'] or '-')[:28]:<28} "
                f"{weight_label(r):<9} {_f(r['us']):>9} {_f(r['eager_us']):>9} "
                f"{_f(r['floor_us']):>8} {_f(r['pct_of_floor'], '{:.0f}%'):>6} "
                f"{_f(r['speedup_vs_fp16'], '{:.2f}'):>6}  {ok}")
    notes = skipped_notes(doc)
    if notes:
        lines += ["", "not timed:"] + [f"  {n}" for n in notes]
    return "\n".join(lines)


def skipped_notes(doc: Dict) -> List[str]:
    counts = collections.Counter((s["backend"], s["bits"], s["reason"])
                                 for s in doc.get("skipped", [])
                                 if not s["reason"].startswith(SAME_AS_BACKEND))
    out = [f"{b} (int{bits}): {reason}  [{n} cases]"
           for (b, bits, reason), n in counts.items()]
    if doc.get("not_run"):
        out.append(f"{len(doc['not_run'])} cases not run: {doc.get('aborted') or doc.get('stopped')}")
    return out


def _best(recs: List[Dict], bits: int, family: str = "dqgemm") -> Optional[Dict]:
    cands = [r for r in recs if r["ok"] and r["us"] and r["bits"] == bits
             and r["family"] == family]
    return min(cands, key=lambda r: r["us"]) if cands else None


def _pick(recs: List[Dict], backend: str, bits: int) -> Optional[Dict]:
    for r in recs:
        if r["backend"] == backend and r["bits"] == bits:
            return r
    return None


def _cell(r: Optional[Dict], with_pct: bool = True) -> str:
    if r is None:
        return "-"
    if not r["ok"]:
        return "NOT OK"
    text = f"{r['us']:.1f} ({r['speedup_vs_fp16']:.2f}x" if r.get("speedup_vs_fp16") else \
        f"{r['us']:.1f} (-"
    if with_pct and r.get("pct_of_floor"):
        text += f", {r['pct_of_floor']:.0f}%"
    return text + ")"


def summary_table(doc: Dict) -> str:
    dev_name = doc.get("device", {}).get("name", "") or ""
    anchors = "H100" in dev_name
    bits = doc.get("settings", {}).get("bits", [4, 8])
    head = f"{'K x N':<12} {'M':>5} {'fp16 us':>9}"
    if anchors:
        head += f" {'anchor':>8}"
    for b in bits:
        head += f"  {f'int{b} auto us (xfp16, %floor)':<30} {f'best int{b} dqgemm':<34}"
    if 4 in bits:
        head += f"  {'torch_int4 us':<24}"
    lines = [header(doc), "", head]
    n_bad = 0
    for (shape, m), recs in _by_shape_m(doc["results"]).items():
        fp16 = _pick(recs, "torch_fp16", 16)
        line = f"{f'{shape[0]}x{shape[1]}':<12} {m:>5} " + \
            f"{(_f(fp16['us']) if fp16 and fp16['ok'] else 'NOT OK' if fp16 else '-'):>9}"
        if anchors:
            line += f" {_f(ANCHOR_FP16_H100.get((shape[0], shape[1], m))):>8}"
        for b in bits:
            best = _best(recs, b)
            best_txt = "-" if best is None else f"{_cell(best, False)} {best['kernel']}"
            line += f"  {_cell(_pick(recs, 'auto', b)):<30} {best_txt[:34]:<34}"
        if 4 in bits:
            line += f"  {_cell(_pick(recs, 'torch_int4', 4)):<24}"
        n_bad += sum(1 for r in recs if not r["ok"])
        lines.append(line)
    lines.append(f"{len(doc['results'])} cases checked, {n_bad} not ok; "
                 f"{len(doc.get('skipped', []))} skipped (see the full table); "
                 f"{doc.get('elapsed_s', 0):.0f} s")
    return "\n".join(lines)


def anchor_comparison(doc: Dict) -> List[Dict]:
    """FP16 rows of this run next to anchors.md's FP16 (only where both exist)."""
    out = []
    for r in doc["results"]:
        if r["backend"] != "torch_fp16" or not r["ok"]:
            continue
        key = (r["shape"][0], r["shape"][1], r["M"])
        if key in ANCHOR_FP16_H100:
            a = ANCHOR_FP16_H100[key]
            out.append({"shape": r["shape"], "M": r["M"], "us": r["us"], "anchor_us": a,
                        "ratio": r["us"] / a})
    return out
