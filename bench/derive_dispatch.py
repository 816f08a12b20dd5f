"""Derive backend="auto" dispatch rules for one GPU from a benchmark JSON.

    python bench/derive_dispatch.py RESULTS.json --device-name H200 [--write]

Reads the records of `python -m dqgemm bench --backends ...,kernels --json RESULTS.json`
(each explicit dqgemm kernel timed on the same cases), finds the fastest kernel for every
(bits, M, shape), and turns them into rules for python/dqgemm/configs/dispatch.json: at each
measured M, the one kernel with the least total slowdown over the shapes, or, where that
beats it by more than 5%, a split by out_features (kernel A for N >= n, kernel B below);
consecutive measured M with the same choice form one M range, and a boundary between two
measured M lies at their geometric midpoint. Every rule's note names the file and the
evidence (worst loss of the choice against each shape's fastest kernel), and the rules are
replayed on the same measurements. With --write the rules replace the ones for the same
device name in dispatch.json (rules for other devices are kept, these go first; rules of
this device with a "programmatic_launch" condition, measured end to end, are kept ahead of
them).

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


def _shapes_at(times, bits: int, m: int) -> List[Tuple[Tuple[int, int], Dict[str, float]]]:
    return [(shape, per_kernel) for (b, mm, shape), per_kernel in sorted(times.items())
            if b == bits and mm == m]


def _cost(per_kernel: Dict[str, float], kernel: str) -> float:
    """log(time of kernel / fastest time) for one shape; inf when the kernel was not timed."""
    if kernel not in per_kernel:
        return math.inf
    return math.log(per_kernel[kernel] / min(per_kernel.values()))


# A split by out_features must beat the best single kernel by this much (sum over shapes of
# log time ratios) to be used: smaller differences are within run-to-run noise.
SPLIT_GAIN = math.log(1.05)


def decide(times, bits: int, m: int) -> Tuple:
    """("one", kernel) or ("split", n_min, kernel for N >= n_min, kernel below): the choice
    with the least total slowdown against the per-shape fastest kernel at (bits, M)."""
    shapes = _shapes_at(times, bits, m)
    kernels = sorted({k for _, per_kernel in shapes for k in per_kernel})
    single = min(kernels, key=lambda k: (sum(_cost(pk, k) for _, pk in shapes), k))
    best_cost = sum(_cost(pk, single) for _, pk in shapes)
    best = ("one", single)
    for n_min in sorted({shape[1] for shape, _ in shapes})[1:]:
        for hi in kernels:
            for lo in kernels:
                if hi == lo:
                    continue
                cost = sum(_cost(pk, hi if shape[1] >= n_min else lo) for shape, pk in shapes)
                if cost < best_cost - SPLIT_GAIN:
                    best_cost, best = cost, ("split", n_min, hi, lo)
    return best


def worst_loss(times, bits: int, m: int, choice: Tuple) -> float:
    """Largest time ratio chosen / fastest over the shapes measured at (bits, M)."""
    worst = 1.0
    for shape, per_kernel in _shapes_at(times, bits, m):
        kernel = choice[1] if choice[0] == "one" else (
            choice[2] if shape[1] >= choice[1] else choice[3])
        if kernel in per_kernel:
            worst = max(worst, per_kernel[kernel] / min(per_kernel.values()))
    return worst


def derive(doc: Dict, device_name: str, source: str) -> List[Dict]:
    times = kernel_times(doc)
    rules = []
    for bits in sorted({b for b, _, _ in times}):
        ms = sorted({m for b, m, _ in times if b == bits})
        runs: List[List[int]] = []
        choices: List[Tuple] = []
        for m in ms:
            choice = decide(times, bits, m)
            if choices and choices[-1] == choice:
                runs[-1].append(m)
            else:
                runs.append([m])
                choices.append(choice)
        for i, (run, choice) in enumerate(zip(runs, choices)):
            m_range = {}
            if i > 0:
                m_range["m_min"] = math.floor(math.sqrt(runs[i - 1][-1] * run[0])) + 1
            if i + 1 < len(runs):
                m_range["m_max"] = math.floor(math.sqrt(run[-1] * runs[i + 1][0]))
            evidence = ", ".join(f"M={m}: worst {worst_loss(times, bits, m, choice):.2f}x the "
                                 f"fastest kernel of each shape" for m in run)
            if choice[0] == "one":
                rules.append(dict(kernel=choice[1], device_name=device_name, bits=bits,
                                  **m_range, note=f"{source}: INT{bits}, least total slowdown "
                                                  f"over the measured shapes ({evidence})"))
            else:
                _, n_min, hi, lo = choice
                note = (f"{source}: INT{bits}, {hi} for N >= {n_min} and {lo} below beat any "
                        f"single kernel by > 5% over the measured shapes ({evidence})")
                rules.append(dict(kernel=hi, device_name=device_name, bits=bits, **m_range,
                                  n_min=n_min, note=note))
                rules.append(dict(kernel=lo, device_name=device_name, bits=bits, **m_range,
                                  note=note))
    return rules


def replay(doc: Dict, rules: List[Dict]) -> List[Tuple]:
    """Offline check of rules on the same measurements: (bits, M, shape, chosen / fastest)
    for every case; the first rule whose bits / M / N conditions hold decides."""
    out = []
    for (bits, m, shape), per_kernel in sorted(kernel_times(doc).items()):
        for r in rules:
            if r.get("bits", bits) != bits or m < r.get("m_min", 0) or \
                    m > r.get("m_max", 1 << 30) or shape[1] < r.get("n_min", 0):
                continue
            if r["kernel"] in per_kernel:
                out.append((bits, m, shape, per_kernel[r["kernel"]] / min(per_kernel.values())))
            break
    return out


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
    ratios = [r[3] for r in replay(doc, rules)]
    if ratios:
        print(f"replayed on the same measurements: {sum(q <= 1.05 for q in ratios)} of "
              f"{len(ratios)} cases within 5% of the fastest kernel, worst {max(ratios):.2f}x "
              f"(in-sample: a fresh run of backend='auto' is the real check)")
    if args.write:
        with open(DISPATCH) as f:
            table = json.load(f)
        # rules for programmatic launches come from end-to-end runs, not from this
        # kernel-only file: kept, ahead of the derived ones they refine
        launch_rules = [r for r in table["rules"] if r.get("device_name") == args.device_name
                        and r.get("programmatic_launch") is not None]
        kept = [r for r in table["rules"] if r.get("device_name") != args.device_name]
        # fp32 and other device-independent rules first, then these, then the rest
        head = [r for r in kept if "device_name" not in r and "min_arch" not in r]
        tail = [r for r in kept if r not in head]
        table["rules"] = head + launch_rules + rules + tail
        with open(DISPATCH, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        print(f"wrote {len(rules)} rules for {args.device_name!r} into {DISPATCH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
