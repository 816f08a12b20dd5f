"""Bar chart of end-to-end decode results (the "e2e" rows of `python -m dqgemm bench
--model ...` JSON files): ms per token of each variant and batch, one bar per file.

    python bench/e2e_plot.py OUT.png LABEL=FILE.json [LABEL=FILE.json ...]

Each bar is annotated with its speedup over the FP16 row of the same file and batch.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path) as f:
        doc = json.load(f)
    rows = {}
    for r in doc["e2e"]:
        if r.get("ok") and r.get("ms_per_token"):
            rows[(r["variant"], r["batch"])] = (r["ms_per_token"], r.get("speedup_vs_fp16"))
    return doc, rows


def main(argv):
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit(__doc__)
    out, specs = argv[0], [a.rsplit("=", 1) for a in argv[1:]]
    runs = [(label, *load(path)) for label, path in specs]
    keys = sorted({k for _, _, rows in runs for k in rows}, key=lambda k: (k[1], k[0]))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(min(14, max(8, 0.9 * len(keys) * len(runs))), 4.5))
    for i, (label, _, rows) in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(keys))]
        ys = [rows.get(k, (0, None))[0] for k in keys]
        bars = ax.bar(xs, ys, width, label=label)
        for bar, k in zip(bars, keys):
            sp = rows.get(k, (0, None))[1]
            if sp and k[0] != "fp16":
                ax.annotate(f"{sp:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{v}\nbatch {b}" for v, b in keys])
    ax.set_ylabel("ms per decode step")
    doc = runs[0][1]
    model = doc["e2e"][0]["model"]
    layers = doc["e2e"][0]["layers"]
    dev = doc["e2e"][0].get("device", "")
    ax.set_title(f"{model} ({layers} layers) decode step, {dev}; labels: x FP16 of the same run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
