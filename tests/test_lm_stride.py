"""STRIDE on language models against plain references (optax full-vocabulary CE, loops)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import tiny_decoder_task
from flax import nnx

from stride_jax.errors import ConfigError
from stride_jax.models import lm_train, transformer
from stride_jax.stride import defaults, losses, method, residual, sites
from stride_jax.stride.operators import SteeringOperators


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_decoder_task()


def test_chunked_ce_matches_full_vocabulary_ce():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hn = jax.random.normal(k1, (37, 8))
    w = jax.random.normal(k2, (8, 53))
    y = jax.random.randint(k3, (37,), 0, 53)
    ref = optax.softmax_cross_entropy_with_integer_labels(hn @ w, y)
    for chunk in (7, 16, 53, 100):
        np.testing.assert_allclose(losses.chunked_token_ce(hn, w, y, chunk), ref, rtol=1e-5)


def test_row_losses_equal_the_training_loss(tiny_lm):
    sp, task = tiny_lm
    upper = residual.Upper(task.graphdef, 1, 10)
    d = task.data(sp.query)
    h = transformer.hidden_at(task.graphdef, task.params, d["tokens"], d["attn"], 1)
    got = upper.row_losses(task.params, h, d["attn"], d["tokens"], d["loss_mask"])
    ref = lm_train.example_losses(
        task.graphdef, task.params, d["tokens"], d["attn"], d["loss_mask"]
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def _random_ops(num_subsets, d, rank, key):
    ops = SteeringOperators(d, d, rank, num_subsets, rngs=nnx.Rngs(key))
    ops.gates[...] = 0.3 * jax.random.normal(key, ops.gates[...].shape)
    return nnx.split(ops, nnx.Param)


def test_response_matrix_matches_a_loop_over_operators(tiny_lm):
    sp, task = tiny_lm
    layer, t = 1, 6
    ops_gd, ops_p = _random_ops(t, 16, 4, jax.random.key(1))
    upper = residual.Upper(task.graphdef, layer, 10)
    data_q = task.data(sp.query)
    cache = residual.encode(task.graphdef, task.params, data_q, layer, 4, 10, 2)
    cfg = ml_collections.ConfigDict(dict(op_chunk=4, query_batch=2))
    y = residual.response_matrix(upper, task.params, ops_gd, ops_p, cache, data_q, cfg)
    ops = nnx.merge(ops_gd, ops_p)
    tok, attn, lm = (np.asarray(data_q[k]) for k in ("tokens", "attn", "loss_mask"))
    for q in range(len(sp.query)):
        h = transformer.hidden_at(
            task.graphdef, task.params, tok[q : q + 1], attn[q : q + 1], layer
        )

        def ce(logits, q=q):
            c = optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], tok[q, 1:])
            return float((c * lm[q, 1:]).sum() / lm[q, 1:].sum())

        base = ce(transformer.logits_from(task.graphdef, task.params, h, attn[q : q + 1], layer))
        for k in range(t):
            delta = ops.shifts(ops.basis(h[0]), jnp.array([k]))[0]
            logits = transformer.logits_from(
                task.graphdef, task.params, h + delta[None], attn[q : q + 1], layer
            )
            np.testing.assert_allclose(y[q, k], base - ce(logits), rtol=1e-4, atol=1e-5)


def test_encode_top_k_matches_full_logits(tiny_lm):
    sp, task = tiny_lm
    d = task.data(sp.query)
    cache = residual.encode(task.graphdef, task.params, d, 1, 5, 8, 3)
    logits = transformer.apply(task.graphdef, task.params, d["tokens"], d["attn"])
    ref_val, ref_idx = jax.lax.top_k(logits, 5)
    np.testing.assert_allclose(cache["top_val"], ref_val, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache["top_idx"], ref_idx)


def test_zero_init_operators_do_not_move_the_model(tiny_lm):
    sp, task = tiny_lm
    ops = SteeringOperators(16, 16, 4, 5, rngs=nnx.Rngs(0))
    ops_gd, ops_p = nnx.split(ops, nnx.Param)
    upper = residual.Upper(task.graphdef, 1, 10)
    data_q = task.data(sp.query)
    cache = residual.encode(task.graphdef, task.params, data_q, 1, 4, 10, 2)
    cfg = ml_collections.ConfigDict(dict(op_chunk=4, query_batch=2))
    y = residual.response_matrix(upper, task.params, ops_gd, ops_p, cache, data_q, cfg)
    np.testing.assert_allclose(y, 0.0, atol=1e-6)


def test_fit_lowers_fidelity_and_scores_are_finite(tiny_lm):
    sp, task = tiny_lm
    cfg = defaults.decoder_adam()
    cfg.design.update(num_subsets=16, degree=2)
    cfg.stage1.update(
        steps=20,
        log_every=10,
        ckpt_every=10,
        subsets_per_step=8,
        sketch_dim=4,
        rank=4,
        top_k=4,
        warmup_steps=2,
        lr=0.05,
    )
    fitted = method.fit(task, cfg)
    scores = method.score(task, fitted, sp.query, cfg)
    assert scores.shape == (len(sp.query), len(sp.train))
    assert np.isfinite(scores).all()
    assert fitted.history[-1]["fidelity"] < float(task.row_losses(sp.train).mean())
    # A Lasso-only change reuses the trained operators (cheap tuning sweeps over the Lasso).
    other = cfg.copy_and_resolve_references()
    other.lasso.lam_frac = 0.2
    assert method.fit(task, other) is fitted
    assert not np.allclose(method.score(task, fitted, sp.query, other), scores)


def test_retrain_ignores_zero_weight_rows(tiny_lm):
    """A masked-out row can change arbitrarily without changing the retrained model."""
    sp, task = tiny_lm
    w = jnp.ones(len(sp.train)).at[:10].set(0.0)
    data = task.data()
    other = dict(data, tokens=data["tokens"].at[:10].set(3))
    fit = lm_train.jitted_fit(task.recipe, task.graphdef)
    a = fit(task.params0, jax.random.key(5), data, w)
    b = fit(task.params0, jax.random.key(5), other, w)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_vmapped_retrains_equal_sequential(tiny_lm):
    from stride_jax.tasks.decoder_task import retrain_losses

    sp, task = tiny_lm
    masks = np.random.default_rng(0).random((2, len(sp.train))) < 0.5
    keys = jax.random.split(jax.random.key(3), 2)
    weights = masks[:, sp.train.example_id_N]
    got = retrain_losses(task, keys, weights, task.data(sp.query), group=2)
    for m in range(2):
        p = task.retrain(keys[m], masks[m].astype(np.float32))
        np.testing.assert_allclose(got[m], task.row_losses(sp.query, p), rtol=2e-5, atol=2e-5)


def test_hook_layer_range():
    cfg = defaults.decoder()
    assert sites.hook_layer(cfg, 3) == 2  # default: two thirds of the depth
    cfg.layer = 3
    assert sites.hook_layer(cfg, 3) == 3  # the final residual is allowed
    cfg.layer = 4
    with pytest.raises(ConfigError, match="stride layer must be in 0..3"):
        sites.hook_layer(cfg, 3)
