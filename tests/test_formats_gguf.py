"""GGUF Q4_0 / Q4_1 / Q8_0 import, checked against the gguf package (quants + GGUFReader).

The gguf pip package (llama.cpp's own Python reader/writer) quantizes and dequantizes the
blocks independently of dqgemm: every import must dequantize to exactly its values.
"""

import numpy as np
import pytest
import torch

import dqgemm
from dqgemm.formats import from_gguf, to_gguf
from dqgemm.loading import load_quantized, unpermute_rope_rows

from _util import assert_close_product, random_activation

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

TYPES = ("Q4_0", "Q4_1", "Q8_0")
SHAPES = [(1, 32), (7, 64), (33, 96), (64, 576), (130, 160)]


def _weight(n, k, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[:, :3] += 0.2          # a few larger values so groups differ in range
    return w


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_equals_gguf_package(ggml_type, shape):
    n, k = shape
    w = _weight(n, k, seed=n * 1000 + k)
    blocks = quants.quantize(w, T[ggml_type])
    expected = quants.dequantize(blocks, T[ggml_type])
    qw = from_gguf(blocks, ggml_type, (n, k))
    assert qw.group_size == 32 and qw.shape == (n, k)
    assert qw.bits == (8 if ggml_type == "Q8_0" else 4)
    assert qw.zero_mode == ("offsets" if ggml_type == "Q4_1" else "symmetric")
    got = qw.dequantize(torch.float32).numpy()
    np.testing.assert_array_equal(got, expected)
    # The exporter writes back the very same bytes.
    back, name = to_gguf(qw)
    assert name == ggml_type
    np.testing.assert_array_equal(back, blocks)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_type_spellings_and_torch_input(ggml_type):
    w = _weight(16, 64, seed=3)
    blocks = quants.quantize(w, T[ggml_type])
    ref = from_gguf(blocks, ggml_type, (16, 64)).dequantize()
    for spelling in (T[ggml_type], int(T[ggml_type]), ggml_type.lower()):
        got = from_gguf(torch.from_numpy(blocks.copy()), spelling, (16, 64)).dequantize()
        assert torch.equal(got, ref)
    flat = from_gguf(blocks.reshape(-1).tobytes(), ggml_type, (16, 64)).dequantize()
    assert torch.equal(flat, ref)


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_on_imported_weight(ggml_type, dtype):
    n, k = 48, 576                       # K = 576: not a multiple of 128, fine for groups of 32
    blocks = quants.quantize(_weight(n, k, seed=11), T[ggml_type])
    qw = from_gguf(blocks, ggml_type, (n, k))
    x = random_activation((5, k), dtype)
    out = torch.full((5, n), float("nan"), dtype=dtype)
    out.copy_(dqgemm.matmul(x, qw, backend="reference"))
    weight = torch.from_numpy(quants.dequantize(blocks, T[ggml_type]))
    assert_close_product(out, x, weight)


def test_reader_roundtrip(tmp_path):
    """A file written by gguf.GGUFWriter, read by GGUFReader, imported from raw blocks."""
    path = str(tmp_path / "t.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    weights = {}
    for i, ggml_type in enumerate(TYPES):
        w = _weight(24 + 8 * i, 96, seed=i)
        blocks = quants.quantize(w, T[ggml_type])
        writer.add_tensor(f"t{i}", blocks, raw_shape=blocks.shape, raw_dtype=T[ggml_type])
        weights[f"t{i}"] = (ggml_type, quants.dequantize(blocks, T[ggml_type]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == 3
    for tensor in reader.tensors:
        ggml_type, expected = weights[tensor.name]
        assert tensor.tensor_type.name == ggml_type
        shape = tuple(int(v) for v in reversed(tensor.shape.tolist()))   # GGUF: (K, N)
        qw = from_gguf(tensor.data, tensor.tensor_type, shape, name=tensor.name)
        np.testing.assert_array_equal(qw.dequantize().numpy(), expected)


def test_unpermute_rope_rows_matches_llama_cpp_permutation():
    """llama.cpp's converter permutes Q/K rows; unpermute_rope_rows must invert it."""
    n_head, head_dim, k = 3, 8, 5
    w = torch.randn(n_head * head_dim, k)
    # The converter's permutation: per head, rows (2, dim/2) -> (dim/2, 2).
    permuted = w.reshape(n_head, 2, head_dim // 2, k).swapaxes(1, 2).reshape(w.shape)
    perm = unpermute_rope_rows(w.shape[0], n_head)
    assert torch.equal(permuted[perm], w)


def _tiny_llama_gguf(path, linear_type="Q4_1", arch="llama"):
    """A 2-layer llama GGUF; returns the dequantized float weights by transformers name."""
    hidden, ffn, heads, kv, vocab = 64, 96, 4, 2, 128
    writer = gguf.GGUFWriter(path, arch)
    writer.add_uint32(f"{arch}.attention.head_count", heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", kv)
    expected = {}
    rng = np.random.default_rng(0)

    def add(gguf_name, hf_name, n, k, ggml_type, rope_heads=None):
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        if ggml_type in ("F32",):
            writer.add_tensor(gguf_name, w if n > 1 else w.reshape(k))
            expected[hf_name] = torch.from_numpy(w.reshape(-1) if n == 1 else w)
            return
        if ggml_type == "Q4_K":          # a type dqgemm does not import: 144-byte blocks of 256
            blocks = rng.integers(0, 255, size=(n, 144), dtype=np.uint8)
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=T.Q4_K)
            return
        blocks = quants.quantize(w, T[ggml_type])
        writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=T[ggml_type])
        deq = torch.from_numpy(quants.dequantize(blocks, T[ggml_type]))
        if rope_heads:       # the file holds llama.cpp's permuted rows; undo for transformers
            deq = deq[unpermute_rope_rows(n, rope_heads)]
        expected[hf_name] = deq

    add("token_embd.weight", "model.embed_tokens.weight", vocab, hidden, "Q8_0")
    writer.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))   # llama 3 style extra
    add("output_norm.weight", "model.norm.weight", 1, hidden, "F32")
    for i in range(2):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", 1, hidden, "F32")
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", 1, hidden, "F32")
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", hidden, hidden,
            linear_type, rope_heads=heads)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", hidden // heads * kv,
            hidden, linear_type, rope_heads=kv)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", hidden // heads * kv,
            hidden, linear_type)
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", hidden, hidden,
            linear_type)
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", ffn, hidden, "Q4_0")
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", ffn, hidden, "Q8_0")
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", hidden, ffn, linear_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(hidden=hidden, ffn=ffn, heads=heads, kv=kv, vocab=vocab), expected


def _tiny_llama(dims, layers=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["ffn"],
        num_hidden_layers=layers, num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv"], tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_load_quantized_tiny_llama_gguf(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    dims, expected = _tiny_llama_gguf(path)
    reference = _tiny_llama(dims)
    reference.load_state_dict(expected, strict=False)
    reference.lm_head.weight = reference.model.embed_tokens.weight
    model = _tiny_llama(dims)
    summary = load_quantized(model, path, backend="reference")
    assert len(summary.loaded) == 2 * 7 + 1            # 7 linears per block + tied lm_head
    assert isinstance(model.lm_head, dqgemm.QuantLinear)
    assert not summary.kept_float and summary.unused == ["rope_freqs.weight"]
    assert "Q8_0" in str(summary) and "Q4_1" in str(summary)
    for name, module in model.named_modules():
        if isinstance(module, dqgemm.QuantLinear) and name != "lm_head":
            assert torch.equal(module.dequantize(), expected[name + ".weight"]), name
    ids = torch.randint(0, dims["vocab"], (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_errors_name_the_tensor(tmp_path):
    blocks = quants.quantize(_weight(8, 64, seed=0), T.Q4_0)
    with pytest.raises(ValueError, match=r"ggml_type: expected one of \('Q4_0', 'Q4_1', 'Q8_0'\)"):
        from_gguf(blocks, "Q4_K", (8, 64))
    with pytest.raises(ValueError, match="ggml_type"):
        from_gguf(blocks, 12, (8, 64))                     # Q4_K's id
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight: expected 288 bytes for a "
                                         r"Q4_0 tensor of shape \(N=8, K=64\)"):
        from_gguf(blocks.reshape(-1)[:-1], "Q4_0", (8, 64), name="blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="multiple of 32"):
        from_gguf(blocks, "Q4_0", (16, 36))
    with pytest.raises(TypeError, match="uint8"):
        from_gguf(blocks.astype(np.int16), "Q4_0", (8, 64))
    with pytest.raises(ValueError, match="group_size=32"):
        to_gguf(dqgemm.quantize(torch.randn(8, 128), bits=4, group_size=128))

    # A linear weight of a type dqgemm cannot import, in a whole-file load.
    path = str(tmp_path / "k.gguf")
    _tiny_llama_gguf(path, linear_type="Q4_K")
    dims = dict(hidden=64, ffn=96, heads=4, kv=2, vocab=128)
    # The loader must refuse the type before looking at the (here meaningless) data.
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight: GGUF type Q4_K is not "
                                         r"supported"):
        load_quantized(_tiny_llama(dims), path)


def test_model_tensors_missing_from_the_file(tmp_path):
    """A model with a layer more than the file: its tensors would keep their random initial
    values, so strict loading names the first of them; strict=False lists them all."""
    path = str(tmp_path / "tiny.gguf")
    dims, _ = _tiny_llama_gguf(path)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.input_layernorm\.weight: missing "
                                         r"from the checkpoint \(expected every tensor of the "
                                         r"model; 9 missing"):
        load_quantized(_tiny_llama(dims, layers=3), path)
    model = _tiny_llama(dims, layers=3)
    summary = load_quantized(model, path, strict=False)
    assert len(summary.missing) == 9 and all(m.startswith("model.layers.2.")
                                             for m in summary.missing)
    assert len(summary.kept_float) == 7                 # layer 2's linears: not in the file


def test_unknown_architecture(tmp_path):
    path = str(tmp_path / "g.gguf")
    _tiny_llama_gguf(path, arch="gemma")
    dims = dict(hidden=64, ffn=96, heads=4, kv=2, vocab=128)
    with pytest.raises(ValueError, match="general.architecture.*'llama'.*got 'gemma'"):
        load_quantized(_tiny_llama(dims), path)
