"""Writes the "measured" table of configs/cuda_prefill.json from sweep JSONs.

    python bench/cuda_prefill_table.py SWEEP.json [SWEEP.json ...] [--write]

Each sweep is the --json output of bench/cuda_prefill_bench.py. For every (bits, K, N, M)
the fastest correct configuration is kept (a later file overrides an earlier one for the
same case); with --write the entries replace the table, each naming its source file.
"""

import argparse
import json
import os
import sys

CONFIG = os.path.join(os.path.dirname(__file__), "..", "python", "dqgemm", "configs",
                      "cuda_prefill.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    table = {}
    for path in args.sweeps:
        with open(path) as f:
            doc = json.load(f)
        for row in doc["rows"]:
            best = row.get("best")
            if not best:
                continue
            key = (row["bits"], row["k"], row["n"], row["m"])
            table[key] = {
                "bits": row["bits"], "k": row["k"], "n": row["n"], "m": row["m"],
                "m_tile": best["m_tile"], "n_tile": best.get("n_tile", 128),
                "k_splits": best["k_splits"],
                "warp_specialized": bool(best.get("warp_specialized", False)),
                "stream_k": bool(best.get("stream_k", False)),
                "us": round(best["us"], 1), "fp16_us": round(row["fp16_us"], 1),
                "source": f"bench/results/{os.path.basename(path)} ({doc['meta']['device']})",
            }
    entries = [table[k] for k in sorted(table)]
    for e in entries:
        print(f"INT{e['bits']} {e['k']}x{e['n']} M={e['m']}: {e['m_tile']}x{e['n_tile']}"
              f"{'ws' if e['warp_specialized'] else ''}/"
              f"{'sk' if e['stream_k'] else e['k_splits']} {e['us']} us "
              f"({e['fp16_us'] / e['us']:.2f}x FP16)")
    if args.write:
        with open(CONFIG) as f:
            cfg = json.load(f)
        cfg["measured"] = entries
        with open(CONFIG, "w") as f:
            json.dump(cfg, f, indent=1)
            f.write("\n")
        print(f"wrote {len(entries)} entries to {CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
