"""Decoder: config round trips, cut points, padding, vmap, generation (parity with HF's
PyTorch models is in test_hf_import.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax.models import transformer as T
from stride_jax.models.transformer import DecoderConfig

# Jitted once per shape: far faster on CPU than op-by-op dispatch.
apply = jax.jit(T.apply, static_argnums=0)

CFGS = {
    "gpt2": DecoderConfig("gpt2", vocab_size=53, d_model=32, n_layers=2, n_heads=4, max_len=16),
    "llama": DecoderConfig(
        "llama",
        vocab_size=53,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_len=16,
        qkv_bias=True,
        tie_embeddings=False,
    ),
}


def _model(cfg, seed=0, scale=0.1):
    """(graphdef, params) with every leaf perturbed, so biases and norm scales matter."""
    graphdef, params = T.build(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return graphdef, jax.tree.unflatten(treedef, noisy)


def _batch(cfg, B=3, L=10, seed=0):
    tokens_BxL = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, L))
    lengths_B = np.linspace(L, 3, B).astype(int)
    mask_BxL = (np.arange(L)[None] < lengths_B[:, None]).astype(np.int32)
    return jnp.asarray(tokens_BxL), jnp.asarray(mask_BxL)


def test_config_resolves_defaults_and_round_trips_through_hf_dicts():
    cfg = DecoderConfig("gpt2", vocab_size=10, d_model=16, n_layers=1, n_heads=2)
    assert (cfg.n_kv_heads, cfg.d_ff, cfg.head_dim) == (2, 64, 8)
    llama = DecoderConfig("llama", 10, 16, 1, 4, n_kv_heads=1, d_ff=24, head_dim=8)
    for c in [cfg, llama, *CFGS.values()]:
        assert DecoderConfig.from_hf(c.to_hf()) == c
    assert CFGS["llama"].to_hf()["model_type"] == "qwen2"
    assert llama.to_hf()["model_type"] == "llama"


def test_config_errors():
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        DecoderConfig.from_hf({"model_type": "bert"})
    hf = CFGS["llama"].to_hf() | {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ValueError, match="rope scaling"):
        DecoderConfig.from_hf(hf)
    with pytest.raises(ValueError, match="n_kv_heads"):
        DecoderConfig("gpt2", 10, 16, 1, 4, n_kv_heads=2)
    with pytest.raises(ValueError, match="family"):
        DecoderConfig("bert", 10, 16, 1, 4)


@pytest.mark.parametrize("family", CFGS)
def test_cut_points_compose_to_apply(family):
    cfg = CFGS[family]
    graphdef, params = _model(cfg)
    tokens_BxL, mask_BxL = _batch(cfg)

    @jax.jit  # one compile for every cut
    def cuts(params):
        out = [T.apply(graphdef, params, tokens_BxL, mask_BxL)]
        for layer in range(cfg.n_layers + 1):
            h_BxLxD = T.hidden_at(graphdef, params, tokens_BxL, mask_BxL, layer)
            out.append(T.logits_from(graphdef, params, h_BxLxD, mask_BxL, layer))
            hn_BxLxD = T.normed_from(graphdef, params, h_BxLxD, mask_BxL, layer)
            out.append(hn_BxLxD @ T.head_matrix(graphdef, params))
        return out

    logits_BxLxV, *others = cuts(params)
    for other_BxLxV in others:
        np.testing.assert_allclose(other_BxLxV, logits_BxLxV, atol=1e-5)
    with pytest.raises(ValueError, match="layer must be in"):
        T.hidden_at(graphdef, params, tokens_BxL, mask_BxL, cfg.n_layers + 1)


def test_head_matrix_is_the_embedding_transposed_when_tied():
    cfg = CFGS["gpt2"]
    graphdef, params = _model(cfg)
    np.testing.assert_array_equal(T.head_matrix(graphdef, params), params["wte"]["embedding"].T)


@pytest.mark.parametrize("family", CFGS)
def test_real_positions_ignore_padding_content_and_amount(family):
    cfg = CFGS[family]
    graphdef, params = _model(cfg)
    tokens_BxL, mask_BxL = _batch(cfg, L=10)
    ref_BxLxV = apply(graphdef, params, tokens_BxL, mask_BxL)
    garbage_BxL = jnp.where(mask_BxL > 0, tokens_BxL, (tokens_BxL * 7 + 3) % cfg.vocab_size)
    longer_BxL = jnp.pad(garbage_BxL, ((0, 0), (0, 5)), constant_values=1)
    longer_mask_BxL = jnp.pad(mask_BxL, ((0, 0), (0, 5)))
    for toks, mask in [(garbage_BxL, mask_BxL), (longer_BxL, longer_mask_BxL)]:
        out_BxLxV = apply(graphdef, params, toks, mask)[:, :10]
        real = np.asarray(mask_BxL) > 0
        np.testing.assert_allclose(
            np.asarray(out_BxLxV)[real], np.asarray(ref_BxLxV)[real], atol=1e-5
        )
    # Each row alone, unpadded, gives the same logits as inside the padded batch.
    for b, n in enumerate(np.asarray(mask_BxL).sum(1)):
        alone_1xnxV = apply(graphdef, params, tokens_BxL[b : b + 1, :n])
        np.testing.assert_allclose(alone_1xnxV[0], ref_BxLxV[b, :n], atol=1e-5)


@pytest.mark.parametrize("family", CFGS)
def test_fully_padded_rows_stay_finite(family):
    cfg = CFGS[family]
    graphdef, params = _model(cfg)
    tokens_BxL, _ = _batch(cfg)
    mask_BxL = jnp.zeros_like(tokens_BxL)
    assert np.isfinite(apply(graphdef, params, tokens_BxL, mask_BxL)).all()
    grads = jax.grad(lambda p: apply(graphdef, p, tokens_BxL, mask_BxL).sum())(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("family", CFGS)
def test_vmap_over_stacked_params_equals_separate_calls(family):
    cfg = CFGS[family]
    (graphdef, p0), (_, p1) = _model(cfg, seed=0), _model(cfg, seed=5)
    tokens_BxL, mask_BxL = _batch(cfg)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1)
    fn = jax.jit(jax.vmap(lambda p: T.apply(graphdef, p, tokens_BxL, mask_BxL)))
    out_MxBxLxV = fn(stacked)
    for m, p in enumerate([p0, p1]):
        np.testing.assert_allclose(
            out_MxBxLxV[m], apply(graphdef, p, tokens_BxL, mask_BxL), atol=1e-5
        )


@pytest.mark.parametrize("family", CFGS)
def test_greedy_generate_matches_argmax_on_unpadded_prefixes(family):
    cfg = CFGS[family]
    graphdef, params = _model(cfg, scale=0.3)
    prompt_1xP = jnp.asarray([[3, 14, 15]])
    ref = list(np.asarray(prompt_1xP[0]))
    for _ in range(4):
        ref.append(int(jnp.argmax(apply(graphdef, params, jnp.asarray([ref]))[0, -1])))
    out_1xT = T.greedy_generate(graphdef, params, prompt_1xP, steps=4)
    assert np.asarray(out_1xT)[0].tolist() == ref
    eos = ref[4]
    stop = ref.index(eos, 3) + 1
    assert (
        np.asarray(T.greedy_generate(graphdef, params, prompt_1xP, 4, eos))[0].tolist()
        == ref[:stop]
    )


def test_sequences_longer_than_max_len_are_rejected():
    cfg = CFGS["gpt2"]
    graphdef, params = T.build(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        apply(graphdef, params, jnp.zeros((1, 17), jnp.int32))
