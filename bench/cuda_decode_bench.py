"""Kernel-only timing of cuda_decode (csrc/decode_gemm.cu) against FP16 cuBLAS, cold L2.

Method (as in ../shared/notes/anchors.md): for each (shape, M) one CUDA graph calls the
kernel once on each of several weight copies (together >= 3x the 50 MB L2, so weights
come from HBM), median of 15 replays, divided by the number of copies. FP16 F.linear is
timed the same way in the same run; the copy bandwidth is measured too.
% of floor: floor = max(bytes / 3.0 TB/s, 2*M*N*K / 657 TFLOP/s), INT4 bytes =
K*N/2 + (K/128)*N*2 + M*K*2 + M*N*2 (INT8 per-channel: K*N + N*2 + M*K*2 + M*N*2).

Usage: python bench/cuda_decode_bench.py [--quick] [--tune] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

import dqgemm
from dqgemm.kernels import cuda_decode as cd

L2_BYTES = 50 * 2**20
HBM = 3.0e12
PEAK = 657e12
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]  # K x N
MS = [1, 2, 4, 8, 16, 32, 64]


def floor_us(m, n, k, bits):
    if bits == 4:
        wbytes = k * n / 2 + (k / 128) * n * 2
    else:
        wbytes = k * n + n * 2
    byts = wbytes + m * k * 2 + m * n * 2
    return max(byts / HBM, 2 * m * n * k / PEAK) * 1e6


def copies_for(nbytes):
    return max(2, math.ceil(3 * L2_BYTES / nbytes) + 1)


def time_calls(calls, replays=15):
    """Median per-call microseconds of a graph that runs every call once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up on the capture stream (workspaces are per stream)
            c()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth():
    """Device copy bandwidth (read + write) as the benchmark suite measures it: an eager
    1 GiB copy timed with events. (A copy captured in a CUDA graph becomes a memcpy node
    that the copy engine may serve: 2.74 TB/s on an H200 against 4.19 TB/s eager.)"""
    from dqgemm.bench import roofline
    return roofline.measure(torch.device("cuda")).bandwidth_gb_s * 1e9


def clone_prepared(p):
    return dataclasses.replace(
        p, packed=p.packed.clone(), scales=p.scales.clone(),
        zero_points=None if p.zero_points is None else p.zero_points.clone(),
        offsets=None if p.offsets is None else p.offsets.clone(),
        variants={k: (v[0].clone(), None if v[1] is None else v[1].clone())
                  for k, v in p.variants.items()})


def prepared_copies(k, n, bits, group_size, dtype, symmetric=True):
    w = torch.randn(n, k, device="cuda") * 0.02
    qw = dqgemm.quantize(w, bits, group_size, symmetric=symmetric)
    del w
    base = cd.prepare_decode(qw)
    base.params_for(dtype)
    nbytes = base.packed.numel() + base.scales.numel() * 2
    copies = [base] + [clone_prepared(base) for _ in range(copies_for(nbytes) - 1)]
    return qw, copies


def bench_decode(copies, qw, m, dtype, blocks_per_sm=None, check=True, producer_warp=None,
                 programmatic_launch=None):
    """producer_warp, programmatic_launch: None = the launch table's choice, True / False
    forces it (M <= 16)."""
    x = torch.randn(m, qw.in_features, device="cuda").to(dtype)
    outs = [torch.empty(m, qw.out_features, device="cuda", dtype=dtype) for _ in copies]
    calls = [(lambda p=p, o=o: cd.decode_matmul(x, p, None, blocks_per_sm, out=o,
                                                producer_warp=producer_warp,
                                                programmatic_launch=programmatic_launch))
             for p, o in zip(copies, outs)]
    err = None
    if check:
        calls[0]()
        ref = x.double() @ qw.dequantize(torch.float64).t()
        err = ((outs[0].double() - ref).norm() / ref.norm()).item()
        del ref
    return time_calls(calls), err


def bench_fp16(k, n, m, cache):
    key = (k, n)
    if key not in cache:
        cache.clear()
        torch.cuda.empty_cache()
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        cache[key] = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
    ws = cache[key]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    return time_calls([(lambda w=w: F.linear(x, w)) for w in ws])


def plot(json_path, png_path):
    """Two panels: % of the floor and speedup over FP16, against M, one line per shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(json_path) as f:
        doc = json.load(f)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in sorted({r["variant"] for r in doc["rows"]}):
        for k, n in sorted({(r["K"], r["N"]) for r in doc["rows"]}):
            rows = sorted((r for r in doc["rows"] if r["variant"] == variant and r["K"] == k
                           and r["N"] == n), key=lambda r: r["M"])
            if not rows:
                continue
            style = "-" if variant.startswith("int4") else "--"
            label = f"{variant} {k}x{n}"
            ms = [r["M"] for r in rows]
            axes[0].plot(ms, [r["pct_floor"] for r in rows], style, marker="o", label=label)
            axes[1].plot(ms, [r["speedup_vs_fp16"] for r in rows], style, marker="o", label=label)
    axes[0].set_ylabel("% of floor (3.0 TB/s, 657 TFLOP/s)")
    axes[1].set_ylabel("speedup over FP16 cuBLAS")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    meta = doc["meta"]
    fig.suptitle(f"cuda_decode on {meta['device']} ({meta['date'][:10]}), cold L2, CUDA graphs")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot-from", default=None, help="only plot this JSON into --plot")
    ap.add_argument("--plot", default=None, help="PNG path for the plot")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true", help="sweep blocks per SM")
    ap.add_argument("--json", default="cuda_decode_bench.json")
    ap.add_argument("--ms", default=None)
    ap.add_argument("--int8", action="store_true", help="also INT8 per-channel")
    ap.add_argument("--bf16", action="store_true", help="also INT4 g128 with bf16")
    args = ap.parse_args()
    if args.plot_from:
        plot(args.plot_from, args.plot or args.plot_from.replace(".json", ".png"))
        return
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    shapes = SHAPES[:1] + SHAPES[3:4] if args.quick else SHAPES
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    meta = {"device": dev, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "copy_bandwidth_TBps": bw / 1e12, "command": " ".join(sys.argv),
            "launch_table": cd.launch_table(), "floor": "max(bytes/3.0TB/s, flops/657TF/s)"}
    print(f"# {dev}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows, tune = [], []
    fp16_cache = {}
    variants = [("int4_g128_fp16", 4, 128, torch.float16)]
    if args.int8:
        variants.append(("int8_pc_fp16", 8, -1, torch.float16))
    if args.bf16:
        variants.append(("int4_g128_bf16", 4, 128, torch.bfloat16))
    fp16_times = {}
    for k, n in shapes:
        for m in ms:
            fp16_times[(k, n, m)] = bench_fp16(k, n, m, fp16_cache)
    fp16_cache.clear()
    torch.cuda.empty_cache()
    for name, bits, gs, dtype in variants:
        for k, n in shapes:
            qw, copies = prepared_copies(k, n, bits, gs, dtype)
            for m in ms:
                if args.tune and name.startswith("int4_g128_fp16") and m in (1, 16, 64):
                    for bps in (1, 2, 3, 4):
                        t, _ = bench_decode(copies, qw, m, dtype, bps, check=False)
                        tune.append({"variant": name, "K": k, "N": n, "M": m,
                                     "blocks_per_sm": bps, "us": t,
                                     "pct_floor": 100 * floor_us(m, n, k, bits) / t})
                        print(f"  tune {name} {k}x{n} M={m} bps={bps}: {t:.1f} us "
                              f"({tune[-1]['pct_floor']:.0f}%)", flush=True)
                t, err = bench_decode(copies, qw, m, dtype)
                fl = floor_us(m, n, k, bits)
                f16 = fp16_times[(k, n, m)]
                rows.append({"variant": name, "K": k, "N": n, "M": m, "us": t, "err": err,
                             "floor_us": fl, "pct_floor": 100 * fl / t, "fp16_us": f16,
                             "speedup_vs_fp16": f16 / t})
                print(f"{name:16s} {k:6d}x{n:<6d} M={m:3d}: {t:8.1f} us  floor {fl:6.1f}  "
                      f"{100 * fl / t:5.1f}%  fp16 {f16:7.1f}  x{f16 / t:5.2f}  err {err:.1e}",
                      flush=True)
            del copies, qw
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows, "tune": tune}, f, indent=1)
    if args.plot:
        plot(args.json, args.plot)
    print("\n| variant | K x N | M | us | % floor | FP16 us | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['K']}x{r['N']} | {r['M']} | {r['us']:.1f} | "
              f"{r['pct_floor']:.0f}% | {r['fp16_us']:.1f} | {r['speedup_vs_fp16']:.2f}x |")


if __name__ == "__main__":
    main()
