"""Plots cuda_prefill sweeps: best configuration's speedup over FP16 against M, per shape.

    python bench/cuda_prefill_plot.py OUT.png LABEL=SWEEP.json[,SWEEP2.json][@SUFFIX] [...]
                                      [--bits 4]

Each LABEL=file is one version's sweep (bench/cuda_prefill_bench.py --json; several files
joined by commas: one sweep run in parts); a file may hold several bit widths, --bits picks
one. With @SUFFIX only the configurations whose tile name ends with SUFFIX count (e.g. @ws,
@wsd: two variants timed in one sweep); "best" is then the fastest of those. One panel per
layer shape, one line per version, a dashed line at 1.0 (FP16 of the same run).
"""

import argparse
import json
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("sweeps", nargs="+", help="LABEL=PATH")
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for item in args.sweeps:
        if "=" not in item:
            ap.error(f"sweeps: expected LABEL=PATH, got {item!r}")
        label, path = item.split("=", 1)
        paths, _, suffix = path.partition("@")
        docs = []
        for one in paths.split(","):
            with open(one) as f:
                docs.append(json.load(f))
        doc = docs[0]
        points = {}
        for row in (r for d in docs for r in d["rows"]):
            if row["bits"] != args.bits:
                continue
            timed = [c["us"] for c in row.get("configs", []) if c.get("us")
                     and (not suffix or c["config"].split("/")[0].endswith(suffix))]
            if not timed:
                continue
            points.setdefault((row["k"], row["n"]), []).append(
                (row["m"], row["fp16_us"] / min(timed)))
        series.append((label, points, doc["meta"]["device"]))
    shapes = sorted({s for _, pts, _ in series for s in pts})
    if not shapes:
        print(f"cuda_prefill_plot: no INT{args.bits} rows in the sweeps", file=sys.stderr)
        return 2
    cols = 4
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        for label, pts, _ in series:
            if shape in pts:
                ms, sp = zip(*sorted(pts[shape]))
                ax.plot(ms, sp, marker="o", label=label)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K x N = {shape[0]}x{shape[1]}")
        ax.set_xlabel("M")
        ax.set_ylabel("x FP16 (best config)")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"cuda_prefill INT{args.bits}, kernel-only, cold L2 ({series[0][2]})")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
