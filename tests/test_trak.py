"""TRAK against a direct numpy computation, projection checks, ensembling and sign."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.stats import spearmanr

from stride_jax.baselines import base, trak
from stride_jax.data import Dataset
from stride_jax.models import mlp


def _task(n=12, f=5, c=3, hidden=(4,), steps=30, seed=0, x=None, y=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32) if x is None else x
    y = rng.integers(0, c, n).astype(np.int32) if y is None else y
    cfg = ml_collections.ConfigDict(
        dict(hidden=hidden, steps=steps, lr=3e-2, weight_decay=1e-2, seed=0)
    )
    fit = jax.jit(lambda k: mlp.fit(cfg, k, jnp.asarray(x), jnp.asarray(y), jnp.ones(len(y)), c))
    params = fit(jax.random.key(0))
    graphdef, _ = mlp.abstract(cfg, x.shape[1], c)
    return base.Task(cfg, graphdef, params, Dataset(x, y, np.arange(len(y))), c)


def _query(q=4, f=5, c=3, seed=1):
    rng = np.random.default_rng(seed)
    return Dataset(
        rng.normal(size=(q, f)).astype(np.float32),
        rng.integers(0, c, q).astype(np.int32),
        np.arange(q),
    )


def _cfg(**kw):
    c = trak.default_config()
    c.update(dict(proj_dim=0, num_models=1, damping=1e-2, chunk=5) | kw)
    return c


def _reference(task, query, damping, proj_PxK=None):
    """Margin gradients by jax.grad of log p - log(1 - p); kernel and (1 - p) in numpy."""

    @jax.jit
    @jax.grad
    def margin_grad(p, x, y):
        prob = jax.nn.softmax(mlp.apply(task.graphdef, p, x[None])[0])[y]
        return jnp.log(prob) - jnp.log(1.0 - prob)

    def feats(ds):
        g = np.stack(
            [
                np.asarray(ravel_pytree(margin_grad(task.params, xi, yi))[0], np.float64)
                for xi, yi in zip(ds.x_NxF, ds.y_N, strict=True)
            ]
        )
        return g if proj_PxK is None else g @ np.asarray(proj_PxK, np.float64)

    phi_tr, phi_q = feats(task.train), feats(query)
    logits = np.asarray(task.logits(task.train.x_NxF), np.float64)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    p_i = (prob / prob.sum(1, keepdims=True))[np.arange(len(task.train)), task.train.y_N]
    kinv = np.linalg.inv(phi_tr.T @ phi_tr + damping * np.eye(phi_tr.shape[1]))
    return phi_q @ kinv @ phi_tr.T * (1.0 - p_i)[None, :]


@pytest.mark.parametrize("proj_dim", [0, 8])  # 0: N < K (dual solve); 8: N > K (primal)
def test_matches_numpy_reference(proj_dim):
    task, query = _task(), _query()
    cfg = _cfg(proj_dim=proj_dim)
    got = base.get("trak").score(task, base.get("trak").fit(task, cfg), query, cfg)
    num_params = ravel_pytree(task.params)[0].shape[0]
    proj = None if proj_dim == 0 else trak.projection(trak.projection_key(cfg, 0), num_params, 8)
    want = _reference(task, query, cfg.damping, proj)
    assert got.shape == (4, 12) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_large_projection_matches_unprojected():
    task, query = _task(n=40, hidden=(8,), seed=2), _query(q=6, seed=3)
    exact = trak.score(task, trak.fit(task, _cfg(damping=0.1)), query, _cfg(damping=0.1))
    cfg = _cfg(proj_dim=2048, damping=0.1)
    proj = trak.score(task, trak.fit(task, cfg), query, cfg)
    assert spearmanr(exact.ravel(), proj.ravel()).statistic > 0.9


def test_projection_blocks_are_deterministic():
    key = jax.random.key(7)
    full = np.asarray(trak.projection(key, 2500, 16))
    assert full.shape == (2500, 16)
    np.testing.assert_array_equal(full, np.asarray(trak.projection(key, 2500, 16)))
    block1 = np.asarray(trak.projection_block(key, 1, 16))
    np.testing.assert_array_equal(full[trak.ROWS : 2 * trak.ROWS], block1)
    np.testing.assert_array_equal(full[:1000], np.asarray(trak.projection(key, 1000, 16)))
    assert not np.allclose(full, np.asarray(trak.projection(jax.random.key(8), 2500, 16)))
    assert abs(full.std() * 4.0 - 1.0) < 0.05  # N(0, 1 / k) entries


def test_ensemble_is_mean_of_single_models():
    task, query = _task(), _query()
    cfg = _cfg(proj_dim=16, num_models=2)
    ens = trak.score(task, trak.fit(task, cfg), query, cfg)
    params = [task.params, task.retrain(jax.random.key(cfg.seed + 1))]
    singles = [
        np.asarray(
            trak.score_one(
                task, trak.fit_one(task, p, trak.projection_key(cfg, m), cfg), query, cfg
            )
        )
        for m, p in enumerate(params)
    ]
    assert not np.allclose(singles[0], singles[1])
    np.testing.assert_allclose(ens, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)


def test_duplicated_query_helps_itself_most():
    """Higher = helps: a training copy of the query ranks at the top of its row."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    y[:5] = rng.integers(0, 3, 5)  # the queries: label noise, so only their copies explain them
    task = _task(hidden=(8,), steps=60, x=x, y=y)
    query = Dataset(x[:5], y[:5], np.arange(5))
    cfg = _cfg(proj_dim=64, damping=1e-2)
    scores = trak.score(task, trak.fit(task, cfg), query, cfg)
    ranks = (scores > scores[np.arange(5), np.arange(5)][:, None]).sum(1)
    assert (ranks == 0).all(), ranks
    assert (scores[np.arange(5), np.arange(5)] > 0).all()
