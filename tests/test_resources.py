"""Automatic retrain group sizes (``resources.models_at_once``) and progress lines: the rule,
and that the group size changes no retrained loss (each model has its own key)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_decoder_task

from stride_jax import resources, sharding, tasks
from stride_jax.data import load_digits
from stride_jax.eval import groundtruth
from stride_jax.models import lm_train, mlp, transformer

GB = 10**9


def test_rule_divides_the_available_memory_and_clamps(monkeypatch):
    monkeypatch.setattr(resources, "host_available_bytes", lambda: 20 * GB)
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(memory_stats=dict)])
    assert resources.available_bytes() == 10 * GB  # half of MemAvailable
    assert resources.models_at_once(0, 100, 1 * GB) == 10
    assert resources.models_at_once(0, 100, 1 * GB, multiple=4) == 8
    assert resources.models_at_once(0, 6, 1 * GB) == 6  # no more than the models
    assert resources.models_at_once(0, 1000, 1000) == resources.MAX_GROUP
    assert resources.models_at_once(0, 100, 50 * GB) == 1  # at least one
    assert resources.models_at_once(7, 100, 50 * GB) == 7  # explicit sizes are kept
    with pytest.raises(ValueError, match=">= 0"):
        resources.models_at_once(-1, 100, GB)


def test_device_memory_limit_is_used_when_reported(monkeypatch):
    stats = {"bytes_limit": 16 * GB, "bytes_in_use": 2 * GB}
    device = types.SimpleNamespace(memory_stats=lambda: stats)
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    assert resources.available_bytes() == 7 * GB


def test_estimates_bound_memory_by_a_row_chunk():
    """One MLP retrain's estimate stops growing with rows beyond the gradient chunk (but for
    the row weights); a decoder's grows with its batch, not with the evaluated rows."""
    one = resources.classifier_retrain_bytes(10**6, 16, (128,), 10, 3000)
    two = resources.classifier_retrain_bytes(2 * 10**6, 16, (128,), 10, 3000)
    assert two - one == 4 * 2 * 10**6
    cfg = transformer.DecoderConfig("gpt2", vocab_size=65, d_model=64, n_layers=2, n_heads=4)
    d = resources.decoder_retrain_bytes
    assert d(cfg, 32, 100, 0) - d(cfg, 16, 100, 0) == d(cfg, 16, 100, 0) - d(cfg, 0, 100, 0) > 0
    assert d(cfg, 16, 200, 0) - d(cfg, 16, 100, 0) == 4 * 4 * 100


def test_progress_lines_are_throttled_and_carry_rate_and_eta(monkeypatch):
    lines, now = [], [0.0]
    monkeypatch.setattr(resources.logging, "info", lambda s, *a: lines.append(s % a if a else s))
    monkeypatch.setattr(resources.time, "monotonic", lambda: now[0])
    p = resources.Progress("ground truth", 100, "models")
    for done, t in [(10, 1.0), (20, 5.0), (30, 6.0), (100, 20.0)]:
        now[0] = t
        p.update(done)
    assert lines == [
        "ground truth: 20/100 models, 4 models/s, ETA 20 s",
        "ground truth: 100/100 models, 5 models/s, 20.0 s",
    ]


def test_auto_group_equals_explicit_group_classifier(tiny, monkeypatch):
    splits = load_digits(n_train=80, n_query=10)
    per_model = resources.classifier_retrain_bytes(80, 64, tiny.model.hidden, 10, 65 * 32 + 33 * 10)
    monkeypatch.setattr(resources, "available_bytes", lambda: int(2.5 * per_model))
    graphdef, _ = mlp.abstract(tiny.model, 64, 10)
    task = tasks.mlp_task(tiny.model, graphdef, None, splits, mesh=sharding.make_mesh())
    masks, keys = groundtruth.masks_and_keys(0, 5, 80, 0.5)
    assert groundtruth.group_size(tiny.model, (80, 64), 10, 5, 0) == 2  # the last group padded
    a = task.retrain_losses(keys, masks, splits.query, group=0)
    b = task.retrain_losses(keys, masks, splits.query, group=5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_full_batch_gradient_equals_one_pass(tiny, monkeypatch):
    """Above the row chunk the MLP's gradient is summed over chunks: the same model."""
    splits = load_digits(n_train=80, n_query=10)
    x, y = jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N)
    w = jnp.asarray(np.arange(80) % 3 > 0, jnp.float32)
    whole = mlp.fit(tiny.model, jax.random.key(0), x, y, w, 10)
    monkeypatch.setattr(mlp._full_batch_grad, "__defaults__", (32,))
    chunked = mlp.fit(tiny.model, jax.random.key(0), x, y, w, 10)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_auto_group_equals_explicit_group_decoder(monkeypatch):
    model = dict(family="gpt2", n_layers=1, n_kv_heads=None)
    recipe = dict(steps=6, batch=4, weight_decay=0)
    sp, task = tiny_decoder_task(16, 24, 11, model, recipe, fit=False)
    cfg, gd, p0, recipe = task.model_config, task.graphdef, task.params0, task.recipe
    from stride_jax.tasks import decoder_task

    per_model = resources.decoder_retrain_bytes(cfg, 4, len(sp.train), 0)
    monkeypatch.setattr(resources, "available_bytes", lambda: int(2.5 * per_model))
    assert decoder_task.group_size(task, 5, 0) == 2
    keys = jax.random.split(jax.random.key(3), 5)
    weights = np.random.default_rng(0).random((5, len(sp.train))) < 0.5
    a = task.retrain_losses(keys, weights, sp.query, group=0)
    b = task.retrain_losses(keys, weights, sp.query, group=5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The evaluation runs recipe.batch rows at a time (11 rows: the last chunk padded).
    p = lm_train.jitted_fit(recipe, gd)(p0, keys[4], task.data(), jnp.asarray(weights[4], float))
    np.testing.assert_allclose(b[4], task.row_losses(sp.query, p), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("select", ["fixed", "heldout"])
def test_lasso_in_query_chunks_equals_all_at_once(select, monkeypatch):
    """Above ~1 GB of queries the Lasso runs a chunk of queries at a time: the same scores."""
    from stride_jax.stride import recover, subsets

    design = subsets.expander(jax.random.key(0), 60, 40, 3)
    y_QxT = np.random.default_rng(0).normal(size=(5, 60)).astype(np.float32)
    cfg = recover.LassoConfig(lam_frac=0.05, maxiter=200, select=select, path_len=3)
    whole = recover.lasso_scores(design, y_QxT, cfg, key=jax.random.key(1))
    monkeypatch.setattr(resources, "available_bytes", lambda: 2 * 128 * 40)  # 2 at a time
    parts = recover.lasso_scores(design, y_QxT, cfg, key=jax.random.key(1))
    for k in whole:
        np.testing.assert_allclose(np.asarray(parts[k]), np.asarray(whole[k]), atol=1e-6)
