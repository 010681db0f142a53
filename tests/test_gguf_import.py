"""GGUF import: tiny random Llama GGUFs written here, checked against the original tensors,
transformers' own torch dequantiser and transformers' GGUF loader (PyTorch)."""

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from experiments.fetch_smollm2 import DEFAULT_OUT, GGUF_NAME, TEXT_NAME  # noqa: E402
from stride_jax.models import gguf_import  # noqa: E402

V, D, N_LAYERS, H, KV, F = 64, 64, 2, 4, 2, 96
HD = D // H

# HF linear name -> (GGUF block tensor, quantisation used for it in the mixed-type file)
_LINEARS = {
    "self_attn.q_proj": ("attn_q", Q.Q8_0),
    "self_attn.k_proj": ("attn_k", Q.Q4_0),
    "self_attn.v_proj": ("attn_v", Q.Q4_1),
    "self_attn.o_proj": ("attn_output", Q.Q5_0),
    "mlp.gate_proj": ("ffn_gate", Q.Q5_1),
    "mlp.up_proj": ("ffn_up", Q.F16),
    "mlp.down_proj": ("ffn_down", Q.BF16),
}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_permute(w, n_heads):
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF rotate-half -> interleaved)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_llama(seed, tied):
    """{HF LlamaForCausalLM name: float32 array} of a tiny random model."""
    rng = np.random.default_rng(seed)
    shapes = {
        "self_attn.q_proj": (H * HD, D),
        "self_attn.k_proj": (KV * HD, D),
        "self_attn.v_proj": (KV * HD, D),
        "self_attn.o_proj": (D, H * HD),
        "mlp.gate_proj": (F, D),
        "mlp.up_proj": (F, D),
        "mlp.down_proj": (D, F),
    }
    t = {
        "model.embed_tokens.weight": rng.normal(size=(V, D)),
        "model.norm.weight": 1 + 0.1 * rng.normal(size=D),
    }
    for i in range(N_LAYERS):
        for name in _NORMS:
            t[f"model.layers.{i}.{name}.weight"] = 1 + 0.1 * rng.normal(size=D)
        for name, shape in shapes.items():
            t[f"model.layers.{i}.{name}.weight"] = rng.normal(size=shape) / np.sqrt(shape[1])
    if not tied:
        t["lm_head.weight"] = 0.2 * rng.normal(size=(V, D))
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_llama_gguf(path, hf, quantised, arch="llama"):
    """Write `hf` as llama.cpp's converter would: GGUF names, permuted q/k, metadata, tokens.

    With `quantised`, linear weights use the types of _LINEARS and lm_head Q8_0; else all F32.
    """
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(F)
    w.add_rope_dimension_count(HD)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(V)])
    w.add_token_types([1] * V)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    names = {
        "model.embed_tokens.weight": ("token_embd.weight", Q.F32),
        "model.norm.weight": ("output_norm.weight", Q.F32),
        "lm_head.weight": ("output.weight", Q.Q8_0),
    }
    for i in range(N_LAYERS):
        for hf_name, g in _NORMS.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = (f"blk.{i}.{g}.weight", Q.F32)
        for hf_name, (g, qtype) in _LINEARS.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = (f"blk.{i}.{g}.weight", qtype)
    for hf_name, array in hf.items():
        name, qtype = names[hf_name]
        if ".attn_q." in name:
            array = llama_permute(array, H)
        elif ".attn_k." in name:
            array = llama_permute(array, KV)
        qtype = qtype if quantised else Q.F32
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, gguf.quants.quantize(array, qtype))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantisation_bound(x, qtype):
    """Largest error each element may have after a round trip through `qtype` (per block)."""
    if qtype == Q.F32:
        return np.zeros_like(x)
    if qtype in (Q.F16, Q.BF16):
        return np.abs(x) * (2.0**-10 if qtype == Q.F16 else 2.0**-7)
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    span = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
    step = {
        Q.Q8_0: amax / 127,
        Q.Q4_0: amax / 8,
        Q.Q5_0: amax / 16,
        Q.Q4_1: span / 15,
        Q.Q5_1: span / 31,
    }
    # one quantisation step, plus float16 rounding of the block's scale (and offset)
    return np.broadcast_to(step[qtype] * 1.01 + amax * 2.0**-10, blocks.shape).reshape(x.shape)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{(quantised, tied): (path, original HF tensors)}."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for quantised, tied in [(False, True), (True, False)]:
        hf = random_llama(seed=int(quantised), tied=tied)
        path = str(root / f"tiny_q{int(quantised)}_t{int(tied)}.gguf")
        write_llama_gguf(path, hf, quantised)
        out[quantised, tied] = path, hf
    return out


def test_f32_tensors_round_trip_exactly(files):
    path, hf = files[False, True]
    config, tensors = gguf_import.read_gguf(path)
    assert sorted(tensors) == sorted(hf)
    for name, x in hf.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], x, err_msg=name)
    assert config["tie_word_embeddings"] and "lm_head.weight" not in tensors


def test_quantised_tensors_within_format_error(files):
    path, hf = files[True, False]
    _, tensors = gguf_import.read_gguf(path)
    assert sorted(tensors) == sorted(hf)
    qtypes = {f"{hf_name}.weight": q for hf_name, (_, q) in _LINEARS.items()}
    for name, x in hf.items():
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        qtype = qtypes.get(suffix, Q.Q8_0 if name == "lm_head.weight" else Q.F32)
        err = np.abs(tensors[name] - x)
        assert np.all(err <= quantisation_bound(x, qtype)), (name, qtype.name, err.max())
        if qtype != Q.F32:
            assert err.max() > 0, name  # really quantised


def test_dequantisation_matches_transformers_torch_dequantiser(files):
    torch = pytest.importorskip("torch")
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    path, _ = files[True, False]
    compared = set()
    for t in gguf.GGUFReader(path).tensors:
        if int(t.tensor_type) not in GGML_BLOCK:  # F32/F16/BF16, and Q5_0/Q5_1 it lacks
            continue
        compared.add(Q(t.tensor_type).name)
        ours = gguf_import._dequantize(t)
        theirs = hf_dequantize(torch.from_numpy(np.array(t.data).reshape(-1)), int(t.tensor_type))
        np.testing.assert_array_equal(ours.reshape(-1), theirs.numpy(), err_msg=t.name)
    assert compared == {"Q8_0", "Q4_0", "Q4_1"}


def test_config_matches_transformers_gguf_config(files):
    transformers = pytest.importorskip("transformers")
    path, _ = files[True, False]
    ours, _ = gguf_import.read_gguf(path)
    theirs = transformers.AutoConfig.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path)
    ).to_dict()
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_parameters",
        "bos_token_id",
        "eos_token_id",
    ):
        assert ours[key] == theirs[key], key
    assert ours["model_type"] == theirs["model_type"] == "llama"


@pytest.mark.parametrize("quantised,tied", [(False, True), (True, False)])
def test_logits_match_transformers_gguf_loader(files, quantised, tied):
    torch = pytest.importorskip("torch")
    from experiments.smollm2_check import torch_model_from_gguf
    from stride_jax.models import transformer

    path, _ = files[quantised, tied]
    cfg, graphdef, params = gguf_import.load_gguf(path)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (
        H,
        KV,
        50000.0,
        tied,
    )
    tokens_BxL = np.random.default_rng(0).integers(0, V, size=(2, 12)).astype(np.int32)
    ours = np.asarray(transformer.apply(graphdef, params, tokens_BxL))
    with torch.no_grad():
        theirs = torch_model_from_gguf(path)(torch.from_numpy(tokens_BxL).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_unpermute_inverts_llama_cpp_permutation():
    x = np.arange(6 * 16 * 3, dtype=np.float32).reshape(6 * 16, 3)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(
            gguf_import.unpermute_rotary_rows(llama_permute(x, heads), heads), x
        )
    bias = np.arange(32, dtype=np.float32)
    np.testing.assert_array_equal(
        gguf_import.unpermute_rotary_rows(llama_permute(bias, 4), 4), bias
    )


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf_import.read_gguf(tmp_path / "nope.gguf")


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"PK\x03\x04 definitely not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_import.read_gguf(path)


def test_truncated_file(files, tmp_path):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(open(files[False, True][0], "rb").read()[:100])
    with pytest.raises(ValueError, match="could not be parsed as GGUF"):
        gguf_import.read_gguf(path)


def test_non_llama_architecture(tmp_path):
    path = str(tmp_path / "gpt2.gguf")
    write_llama_gguf(path, random_llama(0, tied=True), quantised=False, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        gguf_import.read_gguf(path)


def test_unsupported_quantisation_type(tmp_path):
    path = str(tmp_path / "int8.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.ones((V, D), np.int8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    with pytest.raises(ValueError, match="quantisation type I8"):
        gguf_import._dequantize(reader.tensors[0])


@pytest.mark.parametrize(
    "rope_freqs,match",
    [(True, "RoPE scaling"), (False, "no 'llama.feed_forward_length'")],
)
def test_rope_scaling_and_missing_metadata_refused(tmp_path, rope_freqs, match):
    path = str(tmp_path / "partial.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_embedding_length(D)
    w.add_head_count(H)
    w.add_tensor("token_embd.weight", np.ones((V, D), np.float32))
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.ones(HD // 2, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=match):
        gguf_import.read_gguf(path)


SMOLLM2 = os.path.join(DEFAULT_OUT, GGUF_NAME)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(SMOLLM2), reason="run python -m experiments.fetch_smollm2")
def test_smollm2_perplexity_and_torch_agreement():
    pytest.importorskip("torch")
    from experiments import smollm2_check

    results = smollm2_check.run(
        SMOLLM2, os.path.join(DEFAULT_OUT, TEXT_NAME), 256, 256, ["What is 2 + 2?"], 8
    )
    assert results["perplexity_jax"] < 30, results
    assert abs(results["perplexity_jax"] / results["perplexity_torch"] - 1) < 1e-3, results
    assert results["max_abs_logit_diff"] < 1e-2, results
    assert results["answers"][0]["tokens_equal"], results
