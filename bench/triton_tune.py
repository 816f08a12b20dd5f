"""Tune and benchmark the Triton backend on a GPU (kernel-only, cold L2, CUDA graphs).

    python bench/triton_tune.py --mode tune  --out bench/results/triton_tune_h100.json \
        --table python/dqgemm/configs/triton_h100.json
    python bench/triton_tune.py --mode bench --out bench/results/triton_bench_h100.json

Method (as ../shared/notes/anchors.md): each timed call uses its own weight copy; the
copies together hold >= 3x the L2, so weights stream from HBM. One CUDA graph makes every
call once; the median of ``--reps`` replays, divided by the number of copies, is the time
per call. Weights are fresh random codes and scales (never zeros).

--mode tune: for each (shape, M, quantization) every candidate config of
triton_common.candidate_configs is timed next to FP16 cuBLAS (torch.nn.functional.linear)
and cuda_dequant_gemm; the fastest config per problem is written to --table as
table entries (readable keys; dqgemm.kernels.triton_common reads them).
--mode bench: the configs dispatch picks (table, else heuristic), with floors.
--warm-only: run every (problem, config) once without timing (fills Triton's cache; run
several shards in parallel processes with --shard i/n before timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

import dqgemm
from dqgemm import registry
from dqgemm.format import QuantizedWeight
from dqgemm.kernels import triton_common as tc

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]  # (K, N)
MS = [1, 16, 64, 256, 1024]
QUANTS = [  # name, bits, group_size
    ("int4_g128", 4, 128),
    ("int8_pc", 8, -1),
]
ANCHOR_BW = 3.00e12       # bytes/s, device-to-device copy in anchors.md
ANCHOR_FLOPS = 657e12     # fp16 8192^3 matmul in anchors.md
M_BUCKETS = {1: (1, 1), 16: (2, 16), 64: (17, 64), 256: (65, 256), 1024: (257, None)}


def floor_us(bits, gs, m, n, k, bw=ANCHOR_BW, flops=ANCHOR_FLOPS):
    g = 1 if gs == -1 else k // gs
    nbytes = k * n * bits / 8 + g * n * 2 + m * k * 2 + m * n * 2
    return max(nbytes / bw, 2.0 * m * n * k / flops) * 1e6


def random_qweight(n, k, bits, gs, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qdata = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, device="cuda",
                          generator=gen)
    g = 1 if gs == -1 else k // gs
    scales = (torch.rand(n, g, device="cuda", generator=gen) * 0.01 + 0.001).half()
    return QuantizedWeight(qdata=qdata, scales=scales, bits=bits, group_size=gs,
                           in_features=k)


def copies_for(nbytes):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(32, -(-3 * l2 // max(1, nbytes))))


def time_graph(fns, reps, warmup=3):
    """Median microseconds per call of the list of closures (one graph, all of them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(warmup):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for a, b in events:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in events]
    del graph
    return statistics.median(ms) * 1000.0 / len(fns)


def copy_bandwidth():
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = time_graph([lambda: b.copy_(a)], reps=20)
    return 2 * a.numel() / (t * 1e-6)


class Problem:
    """Weight copies (canonical + Triton layout + fp16) of one (shape, quantization)."""

    def __init__(self, k, n, bits, gs, seed=0):
        self.k, self.n, self.bits, self.gs = k, n, bits, gs
        qbytes = k * n * bits // 8
        self.ncopies = copies_for(qbytes)
        self.qws = [random_qweight(n, k, bits, gs, seed + i) for i in range(self.ncopies)]
        self.spec = registry.WeightSpec(bits, gs, k, n)
        self.args = [tc.launch_args(tc.prepare_weight(q), self.spec) for q in self.qws]
        self._dense = None
        self._dequant = None

    def dense(self):
        if self._dense is None:
            n16 = copies_for(self.k * self.n * 2)
            base = self.qws[0].dequantize(torch.float16)
            self._dense = [base] + [base.clone() for _ in range(n16 - 1)]
        return self._dense

    def dequant_prepared(self):
        if self._dequant is None:
            kern = registry.get_kernel("cuda_dequant_gemm")
            self._dequant = (kern, [kern.prepare(q) for q in self.qws])
        return self._dequant


def x_for(m, k, seed=123):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(m, k, device="cuda", generator=gen).half()


TOLERANCE = 2e-3   # fp16 activations (the project's test tolerance)


def check_error(p, x, cfg, ref):
    """Relative Frobenius error of one config on copy 0 (NaN-safe: NaN -> inf)."""
    out = tc.run_with_config(x, p.args[0], None, cfg)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    return err if err == err else float("inf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("tune", "bench"), default="bench")
    ap.add_argument("--out", required=False)
    ap.add_argument("--table", default=None)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cuda-dequant", action="store_true",
                    help="also time the cuda_dequant_gemm kernel (needs dqgemm._C)")
    ap.add_argument("--warm-only", action="store_true")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    shard_i, shard_n = map(int, args.shard.split("/"))
    ms = [int(v) for v in args.ms.split(",")]
    shapes = SHAPES if args.shapes == "all" else [
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dev = torch.device("cuda")
    t_start = time.time()
    results = []
    job = 0
    for qname, bits, gs in QUANTS:
        for (k, n) in shapes:
            mine = [m for m in ms if (job := job + 1) % shard_n == shard_i] \
                if args.warm_only else ms
            if not mine:
                continue
            p = Problem(k, n, bits, gs)
            for m in mine:
                x = x_for(m, k)
                if args.mode == "tune":
                    cfgs = tc.candidate_configs(bits, m)
                else:
                    cfgs = [tc.choose_config(bits, gs, torch.float16, m, n, k, dev)]
                if args.warm_only:
                    for cfg in cfgs:
                        tc.run_with_config(x, p.args[0], None, cfg)
                    torch.cuda.synchronize()
                    continue
                row = {"quant": qname, "bits": bits, "group_size": gs, "k": k, "n": n, "m": m,
                       "copies": p.ncopies,
                       "floor_us_anchor": floor_us(bits, gs, m, n, k)}
                dense = p.dense()
                row["fp16_us"] = time_graph(
                    [lambda w=w: torch.nn.functional.linear(x, w) for w in dense], args.reps)
                if args.cuda_dequant and m >= 64:
                    kern, preps = p.dequant_prepared()
                    row["cuda_dequant_us"] = time_graph(
                        [lambda pr=pr: kern.run(x, pr, None, p.spec) for pr in preps],
                        args.reps)
                ref = x.double() @ p.qws[0].dequantize(torch.float64).t()
                timings = []
                for cfg in cfgs:
                    try:
                        us = time_graph([lambda a=a, c=cfg: tc.run_with_config(x, a, None, c)
                                         for a in p.args], args.reps)
                        timings.append({"config": dataclasses.asdict(cfg), "us": us,
                                        "rel_error": check_error(p, x, cfg, ref)})
                    except Exception as exc:  # a config that does not compile/fit
                        timings.append({"config": dataclasses.asdict(cfg),
                                        "error": f"{type(exc).__name__}: {exc}"[:300]})
                # a config that computes a wrong result never wins (nor enters the table)
                ok = [t for t in timings if "us" in t and t["rel_error"] <= TOLERANCE]
                del ref
                if not ok:
                    print(f"{qname} K={k} N={n} M={m}: no config within tolerance", flush=True)
                    continue
                best = min(ok, key=lambda t: t["us"])
                row["configs"] = timings
                row["best"] = best
                row["triton_us"] = best["us"]
                row["rel_error"] = best["rel_error"]
                row["pct_of_floor"] = 100.0 * row["floor_us_anchor"] / best["us"]
                row["speedup_vs_fp16"] = row["fp16_us"] / best["us"]
                results.append(row)
                fams = {}
                for t in timings:
                    if "us" in t:
                        f = t["config"]["family"] + ("P" if t["config"]["planes"] else "")
                        fams[f] = min(fams.get(f, 1e9), t["us"])
                row["best_per_family_us"] = fams
                print(f"{qname:9s} K={k:5d} N={n:5d} M={m:4d} fp16={row['fp16_us']:8.1f} "
                      f"triton={best['us']:8.1f} ({best['config']['family']}) "
                      + " ".join(f"{f}={v:.1f}" for f, v in fams.items()) + " "
                      f"floor%={row['pct_of_floor']:5.1f} x{row['speedup_vs_fp16']:.2f} "
                      f"err={row['rel_error']:.1e}", flush=True)
                if args.out:
                    dump(args.out, base_meta(args, t_start), results)
            del p
            torch.cuda.empty_cache()
    if args.warm_only:
        return
    meta = base_meta(args, t_start)
    meta["copy_bandwidth_tb_s"] = copy_bandwidth() / 1e12
    if args.out:
        dump(args.out, meta, results)
    if args.table:
        write_table(args.table, results, meta)


def dump(path, meta, results):
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)


def base_meta(args, t_start):
    return {
        "device": torch.cuda.get_device_name(0), "date": datetime.datetime.utcnow().isoformat(),
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "python": platform.python_version(), "dqgemm": dqgemm.__version__,
        "command": " ".join(["python"] + sys.argv), "mode": args.mode,
        "method": "kernel-only, median of CUDA-graph replays over rotated weight copies "
                  "(>= 3x L2), activations fp16, weights random codes",
        "floor": "max(bytes / 3.00 TB/s, 2MNK / 657 TFLOP/s) as in shared/notes/anchors.md",
        "seconds": time.time() - t_start,
    }


def write_table(path, results, meta):
    entries = []
    for r in results:
        lo, hi = M_BUCKETS.get(r["m"], (r["m"], r["m"]))
        cfg = dict(r["best"]["config"])
        entries.append({"bits": r["bits"], "group_size": r["group_size"], "m_min": lo,
                        "m_max": hi, "n": r["n"], "k": r["k"], "config": cfg,
                        "note": f"{r['best']['us']:.1f} us vs fp16 {r['fp16_us']:.1f} us"})
    # Shape-free entries per (bits, M bucket): the config with the best geometric mean of
    # (best time / its time) over the tuned shapes; they serve shapes outside the table.
    by_key = {}
    for r in results:
        by_key.setdefault((r["bits"], r["group_size"], r["m"]), []).append(r)
    for (bits, gs, m), rows in sorted(by_key.items()):
        scores = {}
        for r in rows:
            for t in r["configs"]:
                if "us" in t and t.get("rel_error", 0.0) <= TOLERANCE:
                    key = json.dumps(t["config"], sort_keys=True)
                    scores.setdefault(key, []).append(r["best"]["us"] / t["us"])
        full = {k: v for k, v in scores.items() if len(v) == len(rows)}
        if not full:
            continue
        best = max(full, key=lambda k: statistics.geometric_mean(full[k]))
        lo, hi = M_BUCKETS.get(m, (m, m))
        cfg = json.loads(best)
        cfg["split_k"] = 0
        entries.append({"bits": bits, "m_min": lo, "m_max": hi, "config": cfg,
                        "note": f"any shape: geomean {statistics.geometric_mean(full[best]):.2f} "
                                f"of per-shape best over {len(rows)} shapes"})
    # The GPU's entry is keyed by the short name that triton_common matches as a substring
    # of torch.cuda.get_device_name ("NVIDIA H200" -> "H200"); an existing table keeps the
    # other GPUs' entries.
    name = short_device_name(meta["device"])
    gpus = []
    if os.path.exists(path):
        with open(path) as f:
            gpus = [g for g in json.load(f).get("gpus", []) if g["device_name"] != name]
    gpus.append({"device_name": name, "tuned": f"{meta['date']}, torch {meta['torch']}, "
                                               f"triton {meta['triton']}",
                 "entries": entries})
    table = {"about": "Triton configs measured per GPU by bench/triton_tune.py --mode tune; "
                      "a GPU's entries are used when its device_name is part of the CUDA "
                      "device name; entries are tried in order, the first match wins; unset "
                      "keys match anything; the heuristic in triton_common.heuristic_config "
                      "serves the rest.",
             "gpus": gpus}
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


def short_device_name(full: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "H100": the model token (letter + digits) of the name."""
    for token in full.replace("-", " ").split():
        if len(token) >= 4 and token[0].isalpha() and token[1:].isdigit():
            return token
    return full


if __name__ == "__main__":
    main()
