"""Derive backend="auto" dispatch rules for one GPU from a benchmark JSON.

    python bench/derive_dispatch.py RESULTS.json --device-name H200 [--write]

Reads the records of `python -m dqgemm bench --backends ...,kernels --json RESULTS.json`
(each explicit dqgemm kernel timed on the same cases), finds the fastest kernel for every
(bits, M, shape), and turns the per-M majority winners into rules for
python/dqgemm/configs/dispatch.json: consecutive measured M with the same winner form one
M range, and a boundary between two measured M lies at their geometric midpoint. Every
rule's note names the file and the evidence (wins out of shapes, worst loss of the chosen
kernel against the fastest one). With --write the rules replace the ones for the same
device name in dispatch.json (rules for other devices are kept, these go first).

The printed table shows, for each (bits, M), the fastest kernel per shape, so a person can
check the rules before writing them.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
from typing import Dict, List, Tuple

DISPATCH = os.path.join(os.path.dirname(__file__), "..", "python", "dqgemm", "configs",
                        "dispatch.json")
# Records that name one kernel each: the explicit backends and the per-kernel rows.
CANDIDATE_BACKENDS = ("cuda", "triton")


def kernel_times(doc: Dict) -> Dict[Tuple[int, int, Tuple[int, int]], Dict[str, float]]:
    """(bits, M, shape) -> {kernel: us}; only correct (ok) records of dqgemm kernels."""
    out: Dict = collections.defaultdict(dict)
    for r in doc["results"]:
        if r.get("family") != "dqgemm" or not r.get("ok") or r.get("us") is None:
            continue
        backend = r["backend"]
        if backend.startswith("kernel:"):
            kernel = backend.split(":", 1)[1]
        elif backend in CANDIDATE_BACKENDS:
            kernel = r["kernel"] if backend == "cuda" else "triton"
        else:
            continue
        if kernel == "reference":
            continue
        key = (r["bits"], r["M"], tuple(r["shape"]))
        prev = out[key].get(kernel)
        out[key][kernel] = r["us"] if prev is None else min(prev, r["us"])
    return out


def winners(times) -> Dict[Tuple[int, int], collections.Counter]:
    wins: Dict = collections.defaultdict(collections.Counter)
    for (bits, m, _shape), per_kernel in times.items():
        wins[(bits, m)][min(per_kernel, key=per_kernel.get)] += 1
    return wins


def worst_loss(times, bits: int, m: int, kernel: str) -> float:
    """Largest time ratio chosen / fastest over the shapes measured at (bits, M)."""
    worst = 1.0
    for (b, mm, _shape), per_kernel in times.items():
        if b == bits and mm == m and kernel in per_kernel:
            worst = max(worst, per_kernel[kernel] / min(per_kernel.values()))
    return worst


def derive(doc: Dict, device_name: str, source: str) -> List[Dict]:
    times = kernel_times(doc)
    wins = winners(times)
    rules = []
    for bits in sorted({b for b, _ in wins}):
        ms = sorted(m for b, m in wins if b == bits)
        runs: List[List[int]] = []
        choice: List[str] = []
        for m in ms:
            best = wins[(bits, m)].most_common(1)[0][0]
            if choice and choice[-1] == best:
                runs[-1].append(m)
            else:
                runs.append([m])
                choice.append(best)
        for i, (run, kernel) in enumerate(zip(runs, choice)):
            rule = {"kernel": kernel, "device_name": device_name, "bits": bits}
            if i > 0:
                rule["m_min"] = math.floor(math.sqrt(runs[i - 1][-1] * run[0])) + 1
            if i + 1 < len(runs):
                rule["m_max"] = math.floor(math.sqrt(run[-1] * runs[i + 1][0]))
            evidence = ", ".join(
                f"M={m}: {wins[(bits, m)][kernel]}/{sum(wins[(bits, m)].values())} shapes, "
                f"worst {worst_loss(times, bits, m, kernel):.2f}x the fastest" for m in run)
            rule["note"] = f"{source}: INT{bits} fastest kernel by shape count ({evidence})"
            rules.append(rule)
    return rules


def print_table(doc: Dict) -> None:
    times = kernel_times(doc)
    for (bits, m) in sorted({(b, m) for b, m, _ in times}):
        cells = []
        for (b, mm, shape), per_kernel in sorted(times.items()):
            if b == bits and mm == m:
                best = min(per_kernel, key=per_kernel.get)
                cells.append(f"{shape[0]}x{shape[1]}:{best}({per_kernel[best]:.0f}us)")
        print(f"INT{bits} M={m:5d}  " + "  ".join(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="benchmark JSON (python -m dqgemm bench --json)")
    ap.add_argument("--device-name", required=True,
                    help="substring of the GPU name the rules apply to, e.g. H200")
    ap.add_argument("--write", action="store_true", help="update configs/dispatch.json")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        doc = json.load(f)
    if args.device_name not in str(doc.get("device", "")):
        print(f"--device-name: expected a substring of the results' device "
              f"{doc.get('device')!r}, got {args.device_name!r}", file=sys.stderr)
        return 2
    print_table(doc)
    source = "bench/results/" + os.path.basename(args.results)
    rules = derive(doc, args.device_name, source)
    print(json.dumps(rules, indent=1))
    if args.write:
        with open(DISPATCH) as f:
            table = json.load(f)
        kept = [r for r in table["rules"] if r.get("device_name") != args.device_name]
        # fp32 and other device-independent rules first, then these, then the rest
        head = [r for r in kept if "device_name" not in r and "min_arch" not in r]
        tail = [r for r in kept if r not in head]
        table["rules"] = head + rules + tail
        with open(DISPATCH, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        print(f"wrote {len(rules)} rules for {args.device_name!r} into {DISPATCH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
