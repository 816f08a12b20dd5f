"""Where one end-to-end decode step spends its time: every kernel of a graph replay, timed.

    python bench/e2e_profile.py OUT.json [--model llama3-8b] [--layers N] [--batch 1]
                                [--variants fp16,int4] [--backend auto] [--replays 5]
                                [--pdl on,off]

Builds the model of dqgemm.bench.e2e for each variant, captures one decode step in a CUDA
graph exactly as the benchmark does, replays it under torch.profiler (CUPTI kernel records
carry the GPU start and end of every kernel of the graph) and reports, per step (median over
the replays):
- the step's span (first kernel start to last kernel end), the summed kernel time, and the
  idle time between kernels (span - busy): launch and dependency gaps inside the graph;
- time per kernel class (dqgemm matmul kernels, cuBLAS/lm_head, attention, Triton
  elementwise, copies/other), with counts;
- the kernels of one middle layer in order, each with its duration and the gap before it.

The replays are separated by a host sleep so that they split cleanly in the trace. The
benchmark's ms/token (CUDA events around each replay) is measured in the same run too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from dqgemm.bench import e2e  # noqa: E402


def classify(name: str) -> str:
    n = name.lower()
    if "dqgemm" in n or "decode_gemm" in n or "prefill" in n or "_dq_" in n \
            or "gemv" in n or "splitk" in n:
        return "dqgemm matmul"
    if "add_rmsnorm" in n or "rope" in n or "silu" in n or "rmsnorm" in n:
        return "elementwise (triton)"
    if "fmha" in n or "attention" in n or "softmax" in n or "flash" in n or "sdpa" in n \
            or "efficient" in n:
        return "attention"
    if "gemm" in n or "sm90" in n or "cublas" in n or "cutlass" in n or "nvjet" in n:
        return "cublas gemm"
    if "copy" in n or "memcpy" in n or "fill" in n or "memset" in n:
        return "copy/fill"
    if "reduce" in n or "argmax" in n:
        return "reduce/argmax"
    return "other"


def kernel_events(trace_path: str):
    with open(trace_path) as f:
        data = json.load(f)
    evs = [e for e in data.get("traceEvents", [])
           if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    evs.sort(key=lambda e: e["ts"])
    return [(float(e["ts"]), float(e["dur"]), e["name"]) for e in evs]


def split_steps(evs, min_gap_us=300.0):
    steps, cur, last_end = [], [], None
    for ts, dur, name in evs:
        if last_end is not None and ts - last_end > min_gap_us and cur:
            steps.append(cur)
            cur = []
        cur.append((ts, dur, name))
        last_end = max(last_end or 0.0, ts + dur)
    if cur:
        steps.append(cur)
    return steps


def step_summary(step):
    span = step[-1][0] + step[-1][1] - step[0][0]
    busy = sum(d for _, d, _ in step)
    classes = {}
    for _, d, name in step:
        c = classify(name)
        t, k = classes.get(c, (0.0, 0))
        classes[c] = (t + d, k + 1)
    return span, busy, classes


def profile_variant(cfg, n_layers, variant, backend, batch, replays, device, pdl):
    bits = e2e.VARIANTS[variant]
    torch.manual_seed(0)
    net = e2e.DecoderModel(cfg, n_layers, bits, 128, backend if bits else "auto", device,
                           torch.float16, programmatic_launch=pdl).eval()
    cache_len = 320
    state = e2e._new_state(net, batch, cache_len, 256, device, torch.float16)
    samples = e2e._time_steps(net, state, 20, 3, 256, device, True)
    ms = statistics.median(samples)
    # capture again for the profiled replays (as _time_steps does)
    with torch.no_grad():
        graph = e2e.capture_step(net, state, device)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize(device)
        state.pos.fill_(256)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                graph.replay()
                torch.cuda.synchronize(device)
                time.sleep(0.005)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    prof.export_chrome_trace(path)
    steps = split_steps(kernel_events(path))
    os.unlink(path)
    steps = [s for s in steps if len(s) > 10]
    sums = [step_summary(s) for s in steps]
    span = statistics.median(s[0] for s in sums)
    busy = statistics.median(s[1] for s in sums)
    classes = {}
    for c in sorted({c for s in sums for c in s[2]}):
        classes[c] = {"us": statistics.median(s[2].get(c, (0.0, 0))[0] for s in sums),
                      "count": max(s[2].get(c, (0.0, 0))[1] for s in sums)}
    # one middle layer: from its first add_rmsnorm kernel to the next layer's (two per
    # layer); without those (torch ops), an even share of the step's kernels
    step = steps[len(steps) // 2]
    mid = n_layers // 2
    norm_idx = [i for i, (_, _, n) in enumerate(step) if "rmsnorm" in n.lower()]
    if len(norm_idx) >= 2 * n_layers + 1:
        first, last = norm_idx[2 * mid], norm_idx[2 * mid + 2]
    else:
        per_layer = (len(step) - 8) // max(n_layers, 1)
        first, last = mid * per_layer, (mid + 1) * per_layer
    layer = []
    for i in range(first, last):
        ts, d, name = step[i]
        prev_end = step[i - 1][0] + step[i - 1][1] if i > 0 else ts
        layer.append({"name": name[:120], "class": classify(name), "us": round(d, 2),
                      "gap_before_us": round(ts - prev_end, 2)})
    return {"variant": variant, "backend": backend, "batch": batch, "layers": n_layers,
            "programmatic_launch": pdl,
            "ms_per_token_events": ms, "span_us": span, "busy_us": busy,
            "idle_us": span - busy, "kernels_per_step": len(step), "classes": classes,
            "one_layer": layer, "replays_parsed": len(steps)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", default="fp16,int4")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--pdl", default="on",
                    help="comma list of on/off: dqgemm.programmatic_launch() in the step")
    args = ap.parse_args(argv)
    cfg = e2e.MODELS[args.model]
    n_layers = args.layers or cfg.n_layers
    dev = torch.device("cuda")
    rows = []
    plan = [(v, p == "on") for p in args.pdl.split(",") for v in args.variants.split(",")]
    for v, pdl in plan:
        r = profile_variant(cfg, n_layers, v, args.backend, args.batch, args.replays, dev, pdl)
        rows.append(r)
        print(f"\n== {args.model} x{n_layers} {v}/{args.backend} batch {args.batch} "
              f"pdl={'on' if pdl else 'off'}: "
              f"{r['ms_per_token_events']:.3f} ms/token (events); span {r['span_us']:.0f} us, "
              f"busy {r['busy_us']:.0f}, idle {r['idle_us']:.0f}, {r['kernels_per_step']} "
              "kernels/step")
        for c, x in sorted(r["classes"].items(), key=lambda kv: -kv[1]["us"]):
            print(f"   {c:<22} {x['us']:9.1f} us  {x['count']:5d} kernels")
        print("   one layer:")
        for k in r["one_layer"]:
            print(f"     gap {k['gap_before_us']:6.2f}  {k['us']:7.2f} us  {k['name'][:90]}")
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "command": "python bench/e2e_profile.py " + " ".join(argv or sys.argv[1:])}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
