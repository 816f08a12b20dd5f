"""Grouped bars of a bench/cuda_decode_quick.py JSON: % of the floor per (shape, M, bits) for
each launch variant timed (blocks per SM, producer_warp, programmatic_launch).

    python bench/cuda_decode_quick_plot.py QUICK.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(row):
    if row.get("producer_warp") is None and row.get("blocks_per_sm") is None:
        return "launch table"
    if row.get("producer_warp") is False or row.get("producer_warp") is None:
        return f"ring, {row.get('blocks_per_sm') or 'table'} blocks/SM"
    pdl = " + programmatic launch" if row.get("programmatic_launch") else ""
    return f"copying warp, {row['blocks_per_sm']} blocks/SM{pdl}"


def main(src, dst):
    with open(src) as f:
        doc = json.load(f)
    rows = [r for r in doc["rows"] if r["bits"] in (4, 8)]
    cases = []
    for r in rows:
        key = (r["bits"], r["K"], r["N"], r["M"])
        if key not in cases:
            cases.append(key)
    variants = []
    for r in rows:
        if label(r) not in variants:
            variants.append(label(r))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(10, len(cases) * 0.7), 5))
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, key in enumerate(cases):
            hit = [r for r in rows if (r["bits"], r["K"], r["N"], r["M"]) == key
                   and label(r) == v]
            if hit:
                xs.append(j + i * width)
                ys.append(hit[0]["pct_floor"])
        ax.bar(xs, ys, width, label=v)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"INT{b} {k}x{n}\nM={m}" for b, k, n, m in cases], fontsize=6,
                       rotation=60)
    bw = doc.get("copy_bandwidth_tbs")
    ax.set_ylabel(f"% of floor (bytes / {bw:.2f} TB/s copy bandwidth)" if bw else "% of floor")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    date = doc.get("meta", {}).get("date", "")[:10]
    ax.set_title(f"cuda_decode launch variants on {doc['device']} {date} (cold L2, CUDA graphs)")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
