"""GPU check of the end-to-end benchmark's decode attention (dqgemm.bench.e2e_ops):
the Triton flash-decoding kernel against torch's masked SDPA and a float64 softmax, then
both timed inside a CUDA graph. Under a minute on an H200.

    python bench/e2e_attention_check.py [OUT.json]

Shapes: Llama-3-8B (32 query heads, 8 kv heads) and Llama-3-70B (64 / 8), head_dim 128,
a 320-position cache, batch 1 and 16. Correctness, for fp16 (tolerance 2e-3) and bf16
(1e-2): the relative Frobenius error against float64 at every position 255..319 (max
reported), the Triton kernel run twice (bitwise equal: deterministic) and replayed from a
CUDA graph captured once while pos moves in place (equal to eager: the graph advances with
the position). Timing (fp16, pos 319, the whole cache): a graph of 20 back-to-back calls,
each on its own cache as the layers of the benchmark are, median of 10 replays by CUDA
events, in us per call. The torch impl gets its mask built once outside the graph, as
DecoderModel.step shares one mask among all layers. Exits 1 when a check fails.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from dqgemm.bench import e2e_ops  # noqa: E402
from dqgemm.bench.timing import capture_graph  # noqa: E402

MODELS = {"llama3-8b": (32, 8), "llama3-70b": (64, 8)}
BATCHES = (1, 16)
HEAD_DIM = 128
CACHE_LEN = 320
POSITIONS = range(255, CACHE_LEN)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
CALLS_PER_GRAPH = 20
REPLAYS = 10
TIMED_POS = CACHE_LEN - 1


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d)) v over positions 0..pos, [B, n_heads, d]."""
    b, n_heads, d = q.shape
    n_kv = k.shape[1]
    qg = q.double().view(b, n_kv, n_heads // n_kv, d)
    scores = torch.einsum("bkgd,bksd->bkgs", qg, k[:, :, :pos + 1].double()) / d ** 0.5
    out = torch.einsum("bkgs,bksd->bkgd", scores.softmax(dim=-1), v[:, :, :pos + 1].double())
    return out.reshape(b, n_heads, d)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def inputs(b: int, n_heads: int, n_kv: int, dtype: torch.dtype, seed: int, caches: int = 1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, n_heads, HEAD_DIM, device="cuda", generator=gen).to(dtype)
    shape = (b, n_kv, CACHE_LEN, HEAD_DIM)
    ks = [torch.randn(shape, device="cuda", generator=gen).to(dtype) for _ in range(caches)]
    vs = [torch.randn(shape, device="cuda", generator=gen).to(dtype) for _ in range(caches)]
    return q, ks, vs


def graph_follows_pos(q, k, v) -> bool:
    """A graph captured once, replayed at several positions, equals eager calls."""
    pos = torch.tensor([POSITIONS[0]], device="cuda")
    outs = []
    graph = capture_graph(lambda: outs.append(e2e_ops.decode_attention(q, k, v, pos,
                                                                       "triton")))
    static = outs[-1]                            # the captured call's output
    same = True
    for p in (POSITIONS[0], 300, CACHE_LEN - 1):
        pos.fill_(p)
        graph.replay()
        same &= torch.equal(static, e2e_ops.decode_attention(q, k, v, pos, "triton"))
    return bool(same)


def check(model: str, b: int, dtype: torch.dtype) -> Dict:
    n_heads, n_kv = MODELS[model]
    q, (k,), (v,) = inputs(b, n_heads, n_kv, dtype, seed=b)
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    err = {"triton": 0.0, "torch": 0.0}
    deterministic = True
    for p in POSITIONS:
        pos.fill_(p)
        ref = reference(q, k, v, p)
        out = e2e_ops.decode_attention(q, k, v, pos, "triton")
        deterministic &= torch.equal(out, e2e_ops.decode_attention(q, k, v, pos, "triton"))
        err["triton"] = max(err["triton"], rel_error(out, ref))
        err["torch"] = max(err["torch"], rel_error(e2e_ops.decode_attention(q, k, v, pos,
                                                                           "torch"), ref))
    graph_ok = graph_follows_pos(q, k, v)
    tol = TOLERANCE[dtype]
    ok = err["triton"] <= tol and err["torch"] <= tol and deterministic and graph_ok
    n_splits, split_len, block_s = e2e_ops.attention_splits(b, n_kv, CACHE_LEN)
    return {"model": model, "batch": b, "n_heads": n_heads, "n_kv_heads": n_kv,
            "head_dim": HEAD_DIM, "cache_len": CACHE_LEN, "dtype": str(dtype).split(".")[-1],
            "positions": [POSITIONS[0], POSITIONS[-1]], "err_triton": err["triton"],
            "err_torch": err["torch"], "tolerance": tol, "deterministic": bool(deterministic),
            "graph_follows_pos": graph_ok, "ok": bool(ok), "n_splits": n_splits,
            "split_len": split_len, "block_s": block_s}


def time_impl(impl: str, q, ks, vs, pos, mask) -> float:
    """us per call: a graph of CALLS_PER_GRAPH calls, median of REPLAYS replays."""
    def calls():
        for k, v in zip(ks, vs):
            e2e_ops.decode_attention(q, k, v, pos, impl, mask)
    graph = capture_graph(calls)                 # the warm-up call compiles the kernels
    for _ in range(3):
        graph.replay()
    ms = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        ms.append(start.elapsed_time(end))
    return 1e3 * statistics.median(ms) / CALLS_PER_GRAPH


def timing(model: str, b: int) -> Dict:
    n_heads, n_kv = MODELS[model]
    q, ks, vs = inputs(b, n_heads, n_kv, torch.float16, seed=100 + b, caches=CALLS_PER_GRAPH)
    pos = torch.tensor([TIMED_POS], device="cuda")
    mask = (torch.arange(CACHE_LEN, device="cuda") <= pos).view(1, 1, 1, -1)
    us = {impl: time_impl(impl, q, ks, vs, pos, mask if impl == "torch" else None)
          for impl in ("triton", "torch")}
    return {"model": model, "batch": b, "dtype": "float16", "pos": TIMED_POS,
            "calls_per_graph": CALLS_PER_GRAPH, "replays": REPLAYS,
            "us_triton": us["triton"], "us_torch": us["torch"],
            "speedup": us["torch"] / us["triton"]}


def main(argv: List[str]) -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    checks = [check(m, b, dt) for dt in (torch.float16, torch.bfloat16) for m in MODELS
              for b in BATCHES]
    print(f"correctness, positions {POSITIONS[0]}..{POSITIONS[-1]} of {CACHE_LEN} "
          "(max relative Frobenius error vs float64):")
    print(f"  {'model':<11} {'batch':>5} {'dtype':<9} {'splits':>6} {'triton':>9} "
          f"{'torch':>9} {'tol':>7} {'determ.':>7} {'graph':>5}  result")
    for r in checks:
        print(f"  {r['model']:<11} {r['batch']:>5} {r['dtype']:<9} {r['n_splits']:>6} "
              f"{r['err_triton']:>9.2e} {r['err_torch']:>9.2e} {r['tolerance']:>7.0e} "
              f"{str(r['deterministic']):>7} {str(r['graph_follows_pos']):>5}  "
              f"{'pass' if r['ok'] else 'FAIL'}")
    times = [timing(m, b) for m in MODELS for b in BATCHES]
    print(f"\ntiming, fp16, pos {TIMED_POS}: CUDA graph of {CALLS_PER_GRAPH} calls (one cache "
          f"each), median of {REPLAYS} replays, us per call:")
    print(f"  {'model':<11} {'batch':>5} {'triton':>9} {'torch':>9} {'x torch':>8}")
    for r in times:
        print(f"  {r['model']:<11} {r['batch']:>5} {r['us_triton']:>9.2f} "
              f"{r['us_torch']:>9.2f} {r['speedup']:>8.2f}")
    failed = sum(not r["ok"] for r in checks)
    print(f"\n{len(checks) - failed}/{len(checks)} checks pass; {time.time() - t0:.0f} s")
    if argv:
        import triton
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "triton": triton.__version__,
                "date": time.strftime("%Y-%m-%d", time.gmtime()),
                "command": " ".join(["python", "bench/e2e_attention_check.py"] + argv)}
        # one row per (model, batch, dtype): the checks, and the timing on the fp16 rows
        timed = {(r["model"], r["batch"], r["dtype"]): r for r in times}
        rows = [dict(r, **{k: v for k, v in timed.get((r["model"], r["batch"], r["dtype"]),
                                                      {}).items() if k.startswith("us_")
                           or k in ("speedup", "calls_per_graph", "replays")})
                for r in checks]
        with open(argv[0], "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {argv[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
