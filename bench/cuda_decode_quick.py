"""A ~30-second GPU check of cuda_decode: correctness (all configurations, fixup path,
determinism, graph replay) first, then the key timings. For short device leases.

    python bench/cuda_decode_quick.py out.json
"""
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import cuda_decode_bench as B  # noqa: E402

import dqgemm  # noqa: E402
from dqgemm.bench.timing import capture_graph  # noqa: E402
from dqgemm.kernels import cuda_decode as cd  # noqa: E402

out_path = sys.argv[1] if len(sys.argv) > 1 else "quick.json"
t0 = time.time()
res = {"device": torch.cuda.get_device_name(), "checks": [], "rows": [],
       "meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "torch": torch.__version__, "cuda": torch.version.cuda,
                "command": " ".join(["python"] + sys.argv),
                "launch_table": cd._config()}}


def save():
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


fails = 0
for bits in (4, 8):
    for dtype in (torch.float16, torch.bfloat16):
        for n, k, gs, sym in ((576, 13824, 128, True), (1536, 576, 64, False)):
            qw = dqgemm.quantize(torch.randn(n, k, device="cuda") * 0.02, bits, gs, symmetric=sym)
            prep = cd.prepare_decode(qw)
            w = qw.dequantize(torch.float64)
            # (m, one_sign): activations of one sign (plus an outlier column) are where an
            # accumulation that cancels large terms loses the most bits
            for m, one_sign in ((1, False), (9, False), (33, False), (64, False), (1, True),
                                (9, True)):
                x = torch.randn(m, k, device="cuda")
                if one_sign:
                    x = x.abs() + 1.0
                    x[:, 7] = 60.0
                x = x.to(dtype)
                ref = x.double() @ w.t()
                # M <= 16 also with the copying-warp configuration forced on and off; every M
                # also as a programmatic launch of the cp.async rings
                for producer, pdl in (((None, None), (False, None), (False, True),
                                       (True, False), (True, True))
                                      if m <= 16 else ((None, None), (False, True))):
                    outs = []
                    for _ in range(3):
                        o = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                        cd.decode_matmul(x, prep, None, out=o, producer_warp=producer,
                                         programmatic_launch=pdl)
                        outs.append(o)
                    err = ((outs[0].double() - ref).norm() / ref.norm()).item()
                    same = all(torch.equal(outs[0], o) for o in outs[1:])
                    ok = err <= (2e-3 if dtype == torch.float16 else 1e-2) and same
                    fails += not ok
                    res["checks"].append({"bits": bits, "dtype": str(dtype), "n": n, "k": k,
                                          "gs": gs, "m": m, "one_sign": one_sign, "err": err,
                                          "deterministic": same, "producer_warp": producer,
                                          "programmatic_launch": pdl})
# graph replay equals eager
qw = dqgemm.quantize(torch.randn(1536, 6144, device="cuda") * 0.02, 4, 128)
prep = cd.prepare_decode(qw)
x = torch.randn(5, 6144, device="cuda", dtype=torch.float16)
graph_ok = True
for producer, pdl in ((False, None), (False, True), (True, False), (True, True)):
    launch = {"producer_warp": producer, "programmatic_launch": pdl}
    eager = cd.decode_matmul(x, prep, None, **launch)
    static = torch.empty_like(eager)
    g = capture_graph(lambda: cd.decode_matmul(x, prep, None, out=static, **launch))
    static.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    graph_ok = graph_ok and torch.equal(static, eager)
res["graph_replay_equal"] = graph_ok
res["check_failures"] = fails
print(f"checks: {len(res['checks'])} cases, {fails} failures, graph replay equal: {graph_ok} "
      f"({time.time() - t0:.1f}s)", flush=True)
save()

bw = B.copy_bandwidth()
B.HBM = bw  # the floor uses this run's copy bandwidth, not the H100's 3.0 TB/s
res["copy_bandwidth_tbs"] = bw / 1e12
print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
fp16_cache = {}
# (shape, bits, group, Ms, launches to time: (blocks per SM, producer_warp,
# programmatic_launch), None = the launch table's). At M <= 16, 3 blocks per SM also
# selects the shallower shared-memory ring that lets 3 fit; producer_warp True the
# configuration with a copying warp (3 blocks per SM: 3 stages at M <= 8; fewer: 4 stages;
# M <= 16: 2 blocks), False the cp.async rings; programmatic_launch True a programmatic
# dependent launch (the next call's first weight stages fetched while the previous call
# finishes: calls overlap here as they do in a chain of dependent kernels with
# dqgemm.programmatic_launch()). Earlier plans (the copying warp against the rings on the
# 70B layers) and their results: bench/results/h200_2026-12-02_decode_s8_*_quick.json.
TABLE, RING, RINGL = (None, None, None), (None, False, None), (None, False, True)
P3, P3L, P2L = (3, True, False), (3, True, True), (2, True, True)
plan = [((8192, 28672), 4, 128, (1,), (TABLE, RING, RINGL, P3, P3L)),
        ((8192, 28672), 4, 128, (16,), (TABLE, RING, RINGL, P2L)),
        ((4096, 4096), 4, 128, (1, 16), (TABLE, RINGL, (1, True, True))),
        ((4096, 6144), 4, 128, (1, 16), (TABLE, RINGL)),
        ((4096, 28672), 4, 128, (1, 16), (TABLE, RINGL, P3, P3L)),
        ((14336, 4096), 4, 128, (1, 16), (TABLE, RINGL, P3, P3L)),
        ((8192, 8192), 8, -1, (1,), (TABLE, RINGL)),
        ((4096, 4096), 8, -1, (1,), (TABLE, RINGL)),
        ((8192, 28672), 4, 128, (64,), (TABLE, RINGL))]
for (k, n), bits, gs, ms, launches in plan:
    qw, copies = B.prepared_copies(k, n, bits, gs, torch.float16)
    for m in ms:
        t16 = B.bench_fp16(k, n, m, fp16_cache)
        res["rows"].append({"K": k, "N": n, "M": m, "bits": 16, "us": t16})
        print(f"fp16 {k}x{n} M={m}: {t16:.1f} us", flush=True)
        for bps, producer, pdl in launches:
            if producer and m > cd.PRODUCER_M_MAX:
                continue
            t, _ = B.bench_decode(copies, qw, m, torch.float16, bps, check=False,
                                  producer_warp=producer, programmatic_launch=pdl)
            fl = B.floor_us(m, n, k, bits)
            row = {"K": k, "N": n, "M": m, "bits": bits, "blocks_per_sm": bps,
                   "producer_warp": producer, "programmatic_launch": pdl, "us": t,
                   "floor_us": fl, "pct_floor": 100 * fl / t, "fp16_us": t16}
            res["rows"].append(row)
            print(f"int{bits} {k}x{n} M={m} bps={bps} producer={producer} pdl={pdl}: {t:.1f} us, "
                  f"floor {fl:.1f}, {100 * fl / t:.0f}%, x{t16 / t:.2f} FP16 "
                  f"({time.time() - t0:.1f}s)", flush=True)
            save()
    del copies, qw
    fp16_cache.clear()
    torch.cuda.empty_cache()
print("done", flush=True)
# a failed correctness check makes the call fail, so scripts can stop before timing more
sys.exit(1 if fails or not graph_ok else 0)
