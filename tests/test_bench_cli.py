"""The benchmark suite on a CPU: `python -m dqgemm bench --quick` runs and writes a JSON
document with the schema the issue fixes; a wrong kernel is reported NOT OK and never
timed; the tables, the plot and the end-to-end decode path run; bad options are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dqgemm import registry
from dqgemm.bench import cases, report, roofline, runner, shapes
from dqgemm.bench.shapes import Shape

RECORD_FIELDS = {"shape": list, "M": int, "bits": int, "dtype": str, "backend": str,
                 "ok": bool}
NUMBER_OR_NONE = ("us", "eager_us", "floor_us", "pct_of_floor", "speedup_vs_fp16")
FIXED_ROOF = roofline.Roofline(bandwidth_gb_s=10.0, peak_tflop_s=0.01, peak_dtype="fp16",
                               copy_bytes=0, matmul_size=0)


def check_document(doc):
    for key in ("device", "versions", "bandwidth_gb_s", "peak_tflop_s", "results", "settings",
                "skipped"):
        assert key in doc, key
    assert doc["bandwidth_gb_s"] > 0 and doc["peak_tflop_s"] > 0
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["results"], "no results"
    for r in doc["results"]:
        for key, typ in RECORD_FIELDS.items():
            assert isinstance(r[key], typ), (key, r)
        assert "group_size" in r
        assert len(r["shape"]) == 2 and r["M"] > 0
        assert r["dtype"] in ("fp16", "bf16")
        for key in NUMBER_OR_NONE:
            assert r[key] is None or isinstance(r[key], float), (key, r)
        if r["ok"]:
            assert r["us"] > 0 and r["eager_us"] > 0 and r["floor_us"] > 0
            assert 0 < r["pct_of_floor"] and r["speedup_vs_fp16"] > 0
        else:
            assert r["us"] is None and r["speedup_vs_fp16"] is None


def test_quick_cli_writes_schema(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)   # run what a user runs: no Triton interpreter
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"        # tiny shapes: threads only add contention
    proc = subprocess.run([sys.executable, "-m", "dqgemm", "bench", "--quick", "--no-progress",
                           "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    check_document(doc)
    backends = {r["backend"] for r in doc["results"] if r["ok"]}
    assert {"torch_fp16", "auto", "reference"} <= backends, backends
    for r in doc["results"]:
        if r["backend"] == "torch_fp16":
            assert r["speedup_vs_fp16"] == pytest.approx(1.0)
        if r["backend"] == "auto":
            assert r["kernel"] == "reference" and r["bits"] in (4, 8)
    assert {tuple(r["shape"]) for r in doc["results"]} == {(256, 512), (512, 320)}
    assert "K x N" in proc.stdout and "NOT OK" not in proc.stdout


class _WrongKernel(registry.Kernel):
    """Computes the right product times 1.01: must come out NOT OK and untimed."""

    name = "bench_test_wrong"
    backend = "reference"
    priority = -100
    caches_prepared = False

    def supports(self, problem):
        return None

    def prepare(self, qweight):
        return registry.PreparedWeight(qweight.qdata, qweight.scales)

    def run(self, x, prepared, bias, spec):
        from dqgemm.reference import dequantize_tensors
        w = dequantize_tensors(prepared.packed, prepared.scales, None, None, None, spec.bits,
                               spec.group_size, spec.in_features)
        return (x.float() @ w.t() * 1.01).to(x.dtype)


def _settings(backends, **kw):
    return runner.Settings(shapes=[Shape(128, 96)], ms=[5], bits=[4, 8],
                           dtype=torch.float16, quant=cases.QuantSettings(),
                           backends=backends, device=torch.device("cpu"), reps=2, warmup=1,
                           progress=False, **kw)


def test_wrong_kernel_is_not_ok_and_not_timed(monkeypatch):
    monkeypatch.setitem(registry._KERNELS, _WrongKernel.name, _WrongKernel())
    doc = runner.run(_settings(cases.backend_tokens("reference,kernel:bench_test_wrong")),
                     rf=FIXED_ROOF)
    check_document(doc)
    wrong = [r for r in doc["results"] if r["backend"] == "kernel:bench_test_wrong"]
    assert len(wrong) == 2                       # 2 bit widths
    for r in wrong:
        assert r["ok"] is False and r["us"] is None and r["eager_us"] is None
        assert r["rel_error"] == pytest.approx(0.01, rel=0.05)
    good = [r for r in doc["results"] if r["backend"] == "reference"]
    assert len(good) == 2 and all(r["ok"] and r["rel_error"] < 1e-3 for r in good)
    assert "NOT OK" in report.full_table(doc)


def test_floor_speedup_and_tables():
    doc = runner.run(_settings(cases.backend_tokens("torch_fp16,reference")), rf=FIXED_ROOF)
    check_document(doc)
    r = next(r for r in doc["results"] if r["backend"] == "reference" and r["bits"] == 4
             and r["M"] == 5)
    k, n, m = 128, 96, 5
    nbytes = n * k // 2 + n * (k // 128) * 2 + 2 * m * k + 2 * m * n
    assert r["floor_us"] == pytest.approx(max(nbytes / 10e3, 2 * m * n * k / 0.01e6))
    fp16 = next(x for x in doc["results"] if x["backend"] == "torch_fp16" and x["M"] == 5)
    assert r["speedup_vs_fp16"] == pytest.approx(fp16["us"] / r["us"])
    assert r["pct_of_floor"] == pytest.approx(100 * r["floor_us"] / r["us"])
    text = report.full_table(doc)
    assert "K=128 N=96" in text and "int4 g128" in text and "int8 pc" in text
    assert "128x96" in report.summary_table(doc)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from dqgemm.bench.plot import plot
    doc = runner.run(_settings(cases.backend_tokens("torch_fp16,reference")), rf=FIXED_ROOF)
    path = plot(doc, str(tmp_path / "p.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_e2e_tiny_model_on_cpu():
    from dqgemm.bench.e2e import format_results, run_decode_benchmark
    res = run_decode_benchmark(model="tiny", batch_sizes=(3,), variants=("fp16", "int4"),
                               backend="reference", device="cpu", progress=False, layers=1,
                               context=8, steps=2, warmup=1)
    assert len(res) == 2
    for r in res:
        assert r["ok"], r
        assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_token"])
        assert r["layers"] == 1 and r["model"] == "tiny"
        assert r["programmatic_launch"] is False  # a CPU run: never
    assert {r["variant"] for r in res} == {"fp16", "int4"}
    assert "tokens/s" in format_results(res)
    assert "step: elementwise ops torch, attention torch sdpa + mask, programmatic launch off" \
        in format_results(res)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="shapes"):
        shapes.parse_shapes("4096by4096")
    with pytest.raises(ValueError, match="backends"):
        cases.backend_tokens("cublas9000")
    with pytest.raises(ValueError, match="m: "):
        shapes.parse_ints("1,0", "m")
    assert [str(s) for s in shapes.parse_shapes("llama3-8b,4096x4096")] == \
        ["4096x6144", "4096x4096", "4096x28672", "14336x4096"]
    assert cases.backend_tokens("auto")[0] == "torch_fp16"
    from dqgemm.bench.e2e import run_decode_benchmark
    with pytest.raises(ValueError, match="model"):
        run_decode_benchmark(model="llama9", device="cpu")
    with pytest.raises(ValueError, match="programmatic_launch: needs a CUDA device"):
        run_decode_benchmark(model="tiny", device="cpu", programmatic_launch=True)
    with pytest.raises(TypeError, match="programmatic_launch: expected a bool or None"):
        run_decode_benchmark(model="tiny", device="cpu", programmatic_launch="on")


def test_resume_keeps_cases_and_skips_the_backend_that_broke_the_context():
    first = runner.run(_settings(cases.backend_tokens("torch_fp16,reference")), rf=FIXED_ROOF)
    first["results"] = [r for r in first["results"] if r["backend"] != "reference"]
    first["aborted"], first["aborted_by"] = "simulated illegal address", ["reference"]
    kept = [(r["M"], r["us"]) for r in first["results"]]
    again = runner.run(_settings(cases.backend_tokens("torch_fp16,reference"), resume=first))
    assert "aborted" not in again and again["aborted_by"] == ["reference"]
    assert [(r["M"], r["us"]) for r in again["results"]] == kept       # not re-measured
    assert again["bandwidth_gb_s"] == FIXED_ROOF.bandwidth_gb_s        # ceilings reused
    reasons = [s["reason"] for s in again["skipped"] if s["backend"] == "reference"]
    assert len(reasons) == 2 and all("broke the CUDA context" in r for r in reasons)
