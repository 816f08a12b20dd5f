"""Plot a Triton tuning/bench JSON (bench/triton_tune.py): speedup vs FP16 and % of floor.

    python bench/triton_plot.py bench/results/triton_tune_h100_r2.json bench/results/triton_h100_r2.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    data = json.load(open(src))
    rows = data["results"]
    quants = sorted({r["quant"] for r in rows})
    shapes = sorted({(r["k"], r["n"]) for r in rows})
    fig, axes = plt.subplots(2, len(quants), figsize=(6 * len(quants), 8), squeeze=False)
    for col, q in enumerate(quants):
        for k, n in shapes:
            rs = sorted((r for r in rows if r["quant"] == q and (r["k"], r["n"]) == (k, n)),
                        key=lambda r: r["m"])
            ms = [r["m"] for r in rs]
            axes[0][col].plot(ms, [r["fp16_us"] / r["triton_us"] for r in rs], marker="o",
                              label=f"K={k} N={n}")
            axes[1][col].plot(ms, [r["pct_of_floor"] for r in rs], marker="o",
                              label=f"K={k} N={n}")
        axes[0][col].axhline(1.0, color="k", lw=0.8)
        axes[0][col].set_title(f"Triton {q}: speedup vs FP16 cuBLAS")
        axes[1][col].set_title(f"Triton {q}: % of the {q[:4].upper()} floor")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    meta = data["meta"]
    fig.suptitle(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['date'][:10]}: kernel-only, cold L2, CUDA graphs", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
