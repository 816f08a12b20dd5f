"""--plot: speedup over FP16 against M (log x), one panel per shape, roofline as a line.

Each ok record with a speedup is a point; one line per (backend, bits): one colour per
backend (the same in every panel), solid for INT4, dashed for INT8, dotted for the peers.
The thick black (INT4) and grey (INT8) dash-dot lines are the roofline: FP16's measured
time over the INT-b floor, the speedup a kernel moving only the packed weight at copy
bandwidth would reach (compute-bound at large M, where it falls to ~1x). The reference
backend (the slow fp32 oracle) is left out of the plot; it is in the JSON and the table.
"""

from __future__ import annotations

import collections
import math
from typing import Dict


def plot(doc: Dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import roofline as rl

    results = [r for r in doc["results"]]
    shapes = list(collections.OrderedDict.fromkeys(tuple(r["shape"]) for r in results))
    if not shapes:
        raise ValueError("plot: the document holds no results")
    cols = min(3, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.2 * rows), squeeze=False)
    bw, peak = doc.get("bandwidth_gb_s"), doc.get("peak_tflop_s")
    roof = rl.Roofline(bw, peak, "fp16", 0, 0) if bw and peak else None
    settings = doc.get("settings", {})
    handles = {}
    backends = list(collections.OrderedDict.fromkeys(
        r["backend"] for r in results if r["backend"] not in ("torch_fp16", "reference")))
    palette = plt.get_cmap("tab10" if len(backends) <= 10 else "tab20")
    colors = {b: palette(i % palette.N) for i, b in enumerate(backends)}
    for ax, shape in zip(axes.flat, shapes):
        recs = [r for r in results if tuple(r["shape"]) == shape]
        series = collections.OrderedDict()
        for r in recs:
            if (r["ok"] and r.get("speedup_vs_fp16") and r["backend"] in colors):
                key = (r["backend"], r["bits"], r["family"])
                series.setdefault(key, []).append((r["M"], r["speedup_vs_fp16"]))
        for (backend, bits, family), pts in series.items():
            pts.sort()
            label = f"{backend} int{bits}" if bits != 16 else backend
            style = ":" if family != "dqgemm" else ("-" if bits == 4 else "--")
            (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                           markersize=3, color=colors[backend], label=label)
            handles.setdefault(label, h)
        fp16 = {r["M"]: r["us"] for r in recs if r["backend"] == "torch_fp16" and r["ok"]}
        if roof is not None and fp16:
            for bits in settings.get("bits", [4, 8]):
                gs = settings.get("group_size_int4" if bits == 4 else "group_size_int8")
                ms = sorted(fp16)
                ys = [fp16[m] / roof.floor_us(rl.case_flops(m, shape[0], shape[1]),
                                              rl.case_bytes(m, shape[0], shape[1], bits, gs))
                      for m in ms]
                label = f"roofline int{bits}"
                (h,) = ax.plot(ms, ys, "-.", color="black" if bits == 4 else "gray",
                               linewidth=2.0, label=label)
                handles.setdefault(label, h)
        ax.axhline(1.0, color="red", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (rows of the activation)")
        ax.set_ylabel("speedup over FP16 cuBLAS")
        ax.set_title(f"K={shape[0]} N={shape[1]}")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    dev = doc.get("device", {}).get("name", "")
    fig.suptitle(f"dqgemm vs FP16 on {dev} ({settings.get('dtype')} activations; "
                 f"{doc.get('created_utc', '')})")
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(5, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(handles) / 5), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
