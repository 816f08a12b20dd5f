"""Summary of a per-instruction Nsight Compute export (bench/ncu_source.sh PREFIX.sass.csv).

    python bench/ncu_sass_summary.py PREFIX.sass.csv [--annotate OUT.txt] [--min-share 0.5]

Prints the total executed warp instructions and stall samples, then every run of
consecutive instructions with the same execution count (a basic block, roughly) that holds
at least --min-share % of the instructions or of the samples: its first instruction, its
instructions per launch, and its top stall reasons. --annotate writes every instruction
with its count, samples and top three stall reasons.
"""
import argparse
import collections
import csv
import sys


def load(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    header_at = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr = rows[header_at]
    col = {h: i for i, h in enumerate(hdr)}
    stall_cols = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for r in rows[header_at + 1:]:
        if len(r) < len(hdr):
            continue

        def num(name):
            v = r[col[name]].replace(",", "")
            return int(v) if v.isdigit() else 0
        stalls = {h[6:]: num(h) for h in stall_cols}
        out.append({"sass": r[col["Source"]].strip(),
                    "executed": num("Instructions Executed"),
                    "samples": num("Warp Stall Sampling (All Samples)"),
                    "stalls": {k: v for k, v in stalls.items() if v}})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--annotate", default=None)
    ap.add_argument("--min-share", type=float, default=0.5)
    args = ap.parse_args(argv)
    ins = load(args.csv)
    total_i = sum(r["executed"] for r in ins) or 1
    total_s = sum(r["samples"] for r in ins) or 1
    print(f"{total_i} warp instructions executed, {total_s} stall samples")
    if args.annotate:
        with open(args.annotate, "w") as f:
            for i, r in enumerate(ins):
                top = sorted(r["stalls"].items(), key=lambda kv: -kv[1])[:3]
                f.write(f"{i:5d} {r['executed']:9d} {r['samples']:6d} {r['sass']:60s} {top}\n")
    runs = []
    for i, r in enumerate(ins):
        if not r["executed"] and not r["samples"]:
            continue
        if runs and runs[-1]["executed"] == r["executed"] and runs[-1]["end"] == i - 1:
            run = runs[-1]
            run["end"] = i
            run["count"] += 1
            run["samples"] += r["samples"]
            run["stalls"].update(r["stalls"])
        else:
            runs.append({"start": i, "end": i, "executed": r["executed"], "count": 1,
                         "samples": r["samples"], "first": r["sass"][:44],
                         "stalls": collections.Counter(r["stalls"])})
    print(f"{'instructions':>13} {'x count':>8} {'% inst':>6} {'% samples':>9}  first / top stalls")
    for run in runs:
        inst = run["executed"] * run["count"] / total_i * 100
        samp = run["samples"] / total_s * 100
        if inst < args.min_share and samp < args.min_share:
            continue
        top = ", ".join(f"{k} {v * 100 / max(run['samples'], 1):.0f}%"
                        for k, v in run["stalls"].most_common(3))
        print(f"{run['start']:5d}-{run['end']:<5d} {run['count']:3d} x{run['executed']:<7d} "
              f"{inst:6.1f} {samp:9.1f}  {run['first']:44s} {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
