"""Kernel-only sweep of cuda_prefill (csrc/prefill_gemm.cu) over its launch choices.

For each layer shape and M it times every (m_tile, n_tile, warp_specialized, k_splits or
stream-K) the kernel offers, the choice
of the cost model (configs/cuda_prefill.json), FP16 cuBLAS (F.linear) and, unless
--no-dequant, "dequantize then cuBLAS" (the kernel cuda_dequant_gemm), all in the same run
with the suite's method (dqgemm.bench.timing: CUDA graph of one call per rotated weight copy,
>= 3x L2, warm-up, median). Every timed configuration's output is first checked against
FP16 F.linear on the dequantized weight (relative Frobenius error; fp16 bound 2e-3 plus
the FP16 product's own rounding): a wrong configuration is reported and not timed.
The sweep is the data the cost model's constants are fitted to.

Usage: python bench/cuda_prefill_bench.py [--shapes llama3-8b,llama3-70b] [--m 256,1024,4096]
           [--bits 4,8] [--splits 1,2,3,4] [--m-tiles 64,128,256]
           [--n-tiles 128,256] [--ws 0,1] [--stream-k 0,1] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

import dqgemm
from dqgemm import registry
from dqgemm.bench import shapes as bench_shapes
from dqgemm.bench import timing
from dqgemm.kernels import cuda_decode as cd
from dqgemm.kernels import cuda_prefill as cp


def _weights(k, n, bits, copies, gen):
    group = 128 if bits == 4 else -1
    out = []
    for _ in range(copies):
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.float16) * 0.02
        qw = dqgemm.quantize(w, bits, group)
        out.append((qw, cd.prepare_decode(qw)))
    return out


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _write(path, rows, reps, argv, partial):
    """The sweep's JSON (rewritten after every case, so a run cut short keeps its rows)."""
    if not path:
        return
    doc = {
        "meta": {
            "what": "cuda_prefill launch-choice sweep (bench/cuda_prefill_bench.py)",
            "device": torch.cuda.get_device_name(0),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "command": "python bench/cuda_prefill_bench.py " + " ".join(argv or sys.argv[1:]),
            "method": "kernel-only, CUDA graph per rotated weight copies (>= 3x L2), median "
                      f"of {reps} replays; FP16 = F.linear on the dequantized weight",
            "int4_group_size": 128, "int8_group_size": -1,
        },
        "rows": rows,
    }
    if partial:
        doc["partial"] = True
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--m", default="64,256,1024,4096")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--splits", default="1,2,3,4")
    ap.add_argument("--m-tiles", default=",".join(map(str, cp.M_TILES)))
    ap.add_argument("--n-tiles", default=",".join(map(str, cp.N_TILES)))
    ap.add_argument("--ws", default="0,1", help="warp-specialized variants: 0, 1 or 0,1")
    ap.add_argument("--stream-k", default="0,1",
                    help="stream-K variants of the warp-specialized tiles: 0, 1 or 0,1")
    ap.add_argument("--reps", type=int, default=timing.MIN_REPS)
    ap.add_argument("--no-dequant", action="store_true")
    ap.add_argument("--probe", action="store_true",
                    help="time configurations whose output is wrong too (probe builds that "
                         "skip work on purpose: bench/gpu_check.sh PREFILL_VARIANTS); "
                         "marked probe")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_prefill_bench: needs a GPU", file=sys.stderr)
        return 2
    reason = registry.get_kernel("cuda_prefill").available()
    if reason is not None:
        print(f"cuda_prefill_bench: cuda_prefill unavailable: {reason}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = bench_shapes.parse_shapes(args.shapes)
    ms = [int(v) for v in args.m.split(",")]
    bits_list = [int(v) for v in args.bits.split(",")]
    splits_list = [int(v) for v in args.splits.split(",")]
    m_tiles = [int(v) for v in args.m_tiles.split(",")]
    n_tiles = [int(v) for v in args.n_tiles.split(",")]
    ws_list = [bool(int(v)) for v in args.ws.split(",")]
    sk_list = [bool(int(v)) for v in args.stream_k.split(",")]
    dequant = registry.get_kernel("cuda_dequant_gemm")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    t_start = time.time()
    total = len(shapes) * len(ms) * len(bits_list)
    done = 0
    for bits in bits_list:
        for shape in shapes:
            k, n = shape.k, shape.n
            wbytes = k * n * bits // 8
            copies = timing.copies_for(wbytes, device)
            weights = _weights(k, n, bits, copies, gen)
            dense = [qw.dequantize(torch.float16) for qw, _ in weights]
            for m in ms:
                done += 1
                x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.float16)
                ref = F.linear(x, dense[0])
                row = {"bits": bits, "k": k, "n": n, "m": m, "copies": copies, "configs": []}
                fp16 = timing.time_calls([lambda w=w: F.linear(x, w) for w in dense], device,
                                         reps=args.reps)
                row["fp16_us"] = fp16.us
                if not args.no_dequant:
                    preps = [dequant.prepare(qw) for qw, _ in weights]
                    spec = registry.WeightSpec(bits, weights[0][0].group_size, k, n)
                    t = timing.time_calls([lambda p=p: dequant.run(x, p, None, spec)
                                           for p in preps], device, reps=args.reps)
                    row["dequant_cublas_us"] = t.us
                    del preps
                model = cp.choose_tile(m, n, k, sms, bits)
                row["model_choice"] = model.label
                k_stages = cd.padded_sizes(n, k)[1] // cp.STAGE_K
                for choice in cp.all_choices(max(splits_list)):
                    if (choice.k_splits not in splits_list or choice.m_tile not in m_tiles
                            or choice.n_tile not in n_tiles or choice.k_splits > k_stages
                            or choice.warp_specialized not in ws_list
                            or choice.stream_k not in sk_list):
                        continue
                    out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
                    cp.prefill_matmul(x, weights[0][1], None, m_tile=choice.m_tile,
                                      k_splits=choice.k_splits, n_tile=choice.n_tile,
                                      warp_specialized=choice.warp_specialized,
                                      stream_k=choice.stream_k, out=out)
                    err = _rel_err(out, ref)
                    entry = {"m_tile": choice.m_tile, "n_tile": choice.n_tile,
                             "k_splits": choice.k_splits,
                             "warp_specialized": choice.warp_specialized,
                             "stream_k": choice.stream_k,
                             "config": choice.label, "rel_err": err}
                    wrong = not (err <= 4e-3 and torch.isfinite(out).all())
                    if wrong:
                        entry["not_ok"] = f"relative error {err:.3e}"
                    if args.probe:
                        entry["probe"] = True
                    if not wrong or args.probe:
                        t = timing.time_calls(
                            [lambda p=p, c=choice:
                             cp.prefill_matmul(x, p, None, m_tile=c.m_tile, k_splits=c.k_splits,
                                               n_tile=c.n_tile,
                                               warp_specialized=c.warp_specialized,
                                               stream_k=c.stream_k)
                             for _, p in weights], device, reps=args.reps)
                        entry["us"] = t.us
                    row["configs"].append(entry)
                timed = [c for c in row["configs"] if "us" in c]
                best = min(timed, key=lambda c: c["us"]) if timed else None
                model_us = next((c.get("us") for c in timed
                                 if c["config"] == row["model_choice"]), None)
                row["best"] = best
                rows.append(row)
                _write(args.json, rows, args.reps, argv, partial=True)
                elapsed = time.time() - t_start
                best_txt = (f"best {best['config']} {best['us']:.1f} us "
                            f"({row['fp16_us'] / best['us']:.2f}x FP16)") if best else "none ok"
                model_txt = f"model {row['model_choice']} " + (
                    f"{model_us:.1f} us" if model_us else "-")
                dq_txt = (f"dequant+cuBLAS {row['dequant_cublas_us']:.1f}"
                          if "dequant_cublas_us" in row else "")
                print(f"[{done}/{total} {elapsed:5.0f}s] INT{bits} {k}x{n} M={m}: FP16 "
                      f"{row['fp16_us']:.1f} us, {best_txt}, {model_txt}, {dq_txt}", flush=True)
            del weights, dense
            torch.cuda.empty_cache()
    _write(args.json, rows, args.reps, argv, partial=False)
    print("\nsummary (best cuda_prefill configuration per case, x FP16):")
    for row in rows:
        b = row["best"]
        if b:
            print(f"  INT{row['bits']} {row['k']:>5}x{row['n']:<5} M={row['m']:<5} "
                  f"{b['us']:8.1f} us {row['fp16_us'] / b['us']:5.2f}x  "
                  f"({b['config']}; FP16 {row['fp16_us']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
