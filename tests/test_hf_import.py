"""HF checkpoint import/export: logit parity with transformers' PyTorch models (the independent
reference) on tiny random configs, sharded files, round trips, and clear refusals."""

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from stride_jax.models import hf_import
from stride_jax.models import transformer as T
from stride_jax.models.transformer import DecoderConfig

apply = jax.jit(T.apply, static_argnums=0)

_SMALL = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
)
HF_CASES = {
    "gpt2": ("GPT2Config", dict(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    "llama_gqa": ("LlamaConfig", dict(_SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_qkv_bias": ("Qwen2Config", dict(_SMALL, num_key_value_heads=2, rope_theta=1e6)),
    "llama_untied": ("LlamaConfig", dict(_SMALL, head_dim=16, tie_word_embeddings=False)),
}
OUR_CFGS = {
    "gpt2": DecoderConfig("gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_len=32),
    "llama": DecoderConfig(
        "llama", 61, 32, 2, 4, n_kv_heads=2, d_ff=48, max_len=32, head_dim=16, tie_embeddings=False
    ),
    "qwen2": DecoderConfig("llama", 61, 32, 2, 4, n_kv_heads=1, d_ff=48, max_len=32, qkv_bias=True),
}


def _hf_model(case: str, seed: int = 0):
    """A random transformers model; every parameter (biases, norm scales too) perturbed."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, kwargs = HF_CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs, bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _torch_logits(model, tokens_BxL, mask_BxL) -> np.ndarray:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens_BxL, np.int64)),
            attention_mask=torch.as_tensor(np.asarray(mask_BxL, np.int64)),
        )
    return out.logits.numpy()


def _batch(vocab_size: int, B=3, L=12, seed=0):
    """Random tokens, right-padded to lengths L, 7, 3."""
    tokens_BxL = np.random.default_rng(seed).integers(0, vocab_size, (B, L))
    lengths_B = np.array([L, 7, 3])[:B]
    return tokens_BxL, (np.arange(L)[None] < lengths_B[:, None]).astype(np.int32)


def _max_real_diff(ours_BxLxV, ref_BxLxV, mask_BxL) -> float:
    return float(np.abs(np.asarray(ours_BxLxV) - ref_BxLxV)[np.asarray(mask_BxL) > 0].max())


def _noisy(cfg, seed=0):
    graphdef, params = T.build(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return graphdef, jax.tree.unflatten(treedef, noisy)


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_transformers(case, tmp_path):
    model = _hf_model(case)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, graphdef, params = hf_import.load_hf(tmp_path)
    tokens_BxL, mask_BxL = _batch(cfg.vocab_size)
    ours = apply(graphdef, params, jnp.asarray(tokens_BxL), jnp.asarray(mask_BxL))
    ref = _torch_logits(model, tokens_BxL, mask_BxL)
    assert np.abs(ref).max() > 0.5  # logits big enough for the tolerance to mean something
    assert _max_real_diff(ours, ref, mask_BxL) < 1e-4


def test_sharded_checkpoint_imports_identically(tmp_path):
    model = _hf_model("llama_gqa")
    model.save_pretrained(tmp_path / "one", safe_serialization=True)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg1, _, params1 = hf_import.load_hf(tmp_path / "one")
    cfg2, _, params2 = hf_import.load_hf(tmp_path / "sharded")
    assert cfg1 == cfg2
    _assert_same_params(params1, params2)


@pytest.mark.parametrize("family", OUR_CFGS)
def test_save_hf_round_trips_through_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cfg = OUR_CFGS[family]
    graphdef, params = _noisy(cfg)
    hf_import.save_hf(cfg, params, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens_BxL, mask_BxL = _batch(cfg.vocab_size)
    ours = apply(graphdef, params, jnp.asarray(tokens_BxL), jnp.asarray(mask_BxL))
    assert _max_real_diff(ours, _torch_logits(model, tokens_BxL, mask_BxL), mask_BxL) < 1e-4
    cfg2, _, params2 = hf_import.load_hf(tmp_path)
    assert cfg2 == cfg
    _assert_same_params(params, params2)


def test_unprefixed_bf16_tensors_import():
    """GPT2Model-style names (no "transformer.") and bfloat16 tensors, as hub files have."""
    cfg = OUR_CFGS["gpt2"]
    _, params = _noisy(cfg)
    tensors = {
        name.removeprefix("transformer."): t.astype(ml_dtypes.bfloat16)
        for name, t in hf_import.to_state_dict(cfg, params).items()
    }
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), bool))  # harmless buffer
    cfg2, _, params2 = hf_import.from_state_dict(cfg.to_hf(), tensors)
    assert cfg2 == cfg
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-3)


def test_refuses_pickle_only_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OUR_CFGS["llama"].to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"pickle.*pytorch_model\.bin.*[Cc]onvert.*safetensors"):
        hf_import.load_hf(tmp_path)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_import.load_hf(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        hf_import.load_hf(tmp_path)


def test_missing_unexpected_and_misshapen_tensors_are_named():
    cfg = OUR_CFGS["llama"]
    hf_config = cfg.to_hf()
    good = hf_import.to_state_dict(cfg, T.build(cfg, jax.random.key(0))[1])
    harmless = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    hf_import.from_state_dict(hf_config, good | harmless)

    missing = dict(good)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj"):
        hf_import.from_state_dict(hf_config, missing)

    extra = good | {"model.layers.0.self_attn.extra.weight": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\): model.layers.0.self_attn.extra"):
        hf_import.from_state_dict(hf_config, extra)

    name = "model.layers.0.self_attn.k_proj.weight"
    bad = good | {name: np.zeros((8, 32), np.float32)}
    msg = f"tensor {name}: expected shape (32, 32), got (8, 32)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        hf_import.from_state_dict(hf_config, bad)
