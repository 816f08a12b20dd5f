"""bench/derive_dispatch.py: measured per-kernel times -> dispatch rules (CPU only)."""

import importlib.util
import os

import pytest

from dqgemm import registry

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "derive_dispatch.py")
spec = importlib.util.spec_from_file_location("derive_dispatch", _PATH)
derive_dispatch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(derive_dispatch)


def _rec(backend, kernel, shape, m, us, bits=4, ok=True):
    return {"family": "dqgemm", "backend": backend, "kernel": kernel, "shape": list(shape),
            "M": m, "bits": bits, "us": us, "ok": ok}


def _doc():
    small, big = (4096, 4096), (8192, 57344)
    recs = []
    # M = 1 and 16: cuda_decode wins everywhere; M = 64: cuda_decode only on the big N
    # (by 20%), triton on the small one; M = 1024: triton everywhere
    for m, dec_small, tri_small, dec_big, tri_big in (
            (1, 10.0, 12.0, 90.0, 120.0), (16, 12.0, 14.0, 110.0, 140.0),
            (64, 50.0, 18.0, 270.0, 330.0)):
        recs += [_rec("cuda", "cuda_decode", small, m, dec_small),
                 _rec("triton", "triton", small, m, tri_small),
                 _rec("cuda", "cuda_decode", big, m, dec_big),
                 _rec("triton", "triton", big, m, tri_big)]
    recs += [_rec("triton", "triton", small, 1024, 55.0),
             _rec("cuda", "cuda_dequant_gemm", small, 1024, 60.0),
             _rec("triton", "triton", big, 1024, 1600.0),
             _rec("cuda", "cuda_dequant_gemm", big, 1024, 1700.0),
             # a wrong result is never a candidate, however fast
             _rec("cuda", "cuda_dequant_gemm", big, 1024, 1.0, ok=False),
             _rec("kernel:reference", "reference", small, 1, 0.5)]
    return {"device": {"name": "NVIDIA H200"}, "results": recs}


def test_rules_follow_the_measurements():
    rules = derive_dispatch.derive(_doc(), "H200", "bench/results/x.json")
    got = [(r["kernel"], r.get("m_min"), r.get("m_max"), r.get("n_min")) for r in rules]
    # boundaries at geometric midpoints: sqrt(16 * 64) = 32, sqrt(64 * 1024) = 256
    assert got == [("cuda_decode", None, 32, None),
                   ("cuda_decode", 33, 256, 57344), ("triton", 33, 256, None),
                   ("triton", 257, None, None)]
    assert all(r["device_name"] == "H200" and r["bits"] == 4 for r in rules)
    assert all("bench/results/x.json" in r["note"] for r in rules)


def test_rules_replay_and_parse_as_dispatch_rules():
    doc = _doc()
    rules = derive_dispatch.derive(doc, "H200", "x")
    ratios = [r[3] for r in derive_dispatch.replay(doc, rules)]
    assert len(ratios) == 8 and max(ratios) == pytest.approx(1.0)
    for r in rules:  # every key is one the registry's rules understand
        registry.DispatchRule(**r)


def test_device_name_must_match_the_results():
    import json
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(_doc(), f)
    try:
        assert derive_dispatch.main([f.name, "--device-name", "H100"]) == 2
    finally:
        os.unlink(f.name)


def test_write_keeps_the_programmatic_launch_rules(tmp_path, monkeypatch):
    """--write replaces the device's kernel-only rules but keeps its rules measured end to
    end under programmatic launch (and every other device's), in front of the new ones."""
    import json
    table = {"about": "x", "rules": [
        {"kernel": "reference", "dtype": "fp32", "note": "fp32"},
        {"kernel": "cuda_decode", "device_name": "H200", "bits": 8, "m_max": 1,
         "programmatic_launch": True, "note": "e2e"},
        {"kernel": "triton", "device_name": "H200", "bits": 4, "note": "old, replaced"},
        {"kernel": "triton", "device_name": "H100", "bits": 4, "note": "other device"}]}
    dispatch = tmp_path / "dispatch.json"
    dispatch.write_text(json.dumps(table))
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_doc()))
    monkeypatch.setattr(derive_dispatch, "DISPATCH", str(dispatch))
    assert derive_dispatch.main([str(results), "--device-name", "H200", "--write"]) == 0
    notes = [r["note"] for r in json.loads(dispatch.read_text())["rules"]]
    assert notes[:2] == ["fp32", "e2e"]
    assert "old, replaced" not in notes and notes[-1] == "other device"
    assert len(notes) == 2 + 4 + 1
