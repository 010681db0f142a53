"""TRAK against a direct numpy computation, projection checks, ensembling and sign."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from scipy.stats import spearmanr

from stride_jax import methods
from stride_jax.data import Dataset
from stride_jax.errors import ConfigError
from stride_jax.func import projections
from stride_jax.methods import grad
from stride_jax.models import mlp
from stride_jax.tasks import ClassifierTask

TRAK = methods.get("trak", "classifier")


def mlp_task(cfg, graphdef, params, train, c):
    return ClassifierTask(
        graphdef=graphdef,
        params=params,
        train=train,
        num_classes=c,
        logits_fn=mlp.apply,
        features_fn=mlp.apply_features,
        retrain_fn=mlp.jitted_fit(cfg, c),
        model_config=cfg,
        seed=cfg.seed,
    )


def _scores(task, query, cfg):
    return TRAK.score(task, TRAK.fit(task, cfg), query, cfg)


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
    return mlp_task(cfg, graphdef, params, Dataset(x, y, np.arange(len(y))), c)


def _query(q=4, f=5, c=3, seed=1):
    rng = np.random.default_rng(seed)
    return Dataset(
        rng.normal(size=(q, f)).astype(np.float32),
        rng.integers(0, c, q).astype(np.int32),
        np.arange(q),
    )


def _cfg(**kw):
    c = grad.default_config("trak", "classifier")
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
    got = _scores(task, query, cfg)
    num_params = ravel_pytree(task.params)[0].shape[0]
    key = projections.projection_key(cfg.seed, 0)
    proj = None if proj_dim == 0 else projections.projection(key, num_params, 8)
    want = _reference(task, query, cfg.damping, proj)
    assert got.shape == (4, 12) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_large_projection_matches_unprojected():
    task, query = _task(n=40, hidden=(8,), seed=2), _query(q=6, seed=3)
    exact = _scores(task, query, _cfg(damping=0.1))
    proj = _scores(task, query, _cfg(proj_dim=2048, damping=0.1))
    assert spearmanr(exact.ravel(), proj.ravel()).statistic > 0.9


def test_projection_blocks_are_deterministic():
    key = jax.random.key(7)
    full = np.asarray(projections.projection(key, 2500, 16))
    assert full.shape == (2500, 16)
    np.testing.assert_array_equal(full, np.asarray(projections.projection(key, 2500, 16)))
    block1 = np.asarray(projections.projection_block(key, 1, 16))
    rows = projections.ROWS
    np.testing.assert_array_equal(full[rows : 2 * rows], block1)
    np.testing.assert_array_equal(full[:1000], np.asarray(projections.projection(key, 1000, 16)))
    other = projections.projection(jax.random.key(8), 2500, 16)
    assert not np.allclose(full, np.asarray(other))
    g = np.random.default_rng(0).normal(size=2500).astype(np.float32)  # streamed == whole
    streamed = np.asarray(projections.project(jnp.asarray(g), key, 16))
    np.testing.assert_allclose(streamed, g @ full, rtol=1e-4, atol=1e-5)
    assert abs(full.std() * 4.0 - 1.0) < 0.05  # N(0, 1 / k) entries


def test_ensemble_is_mean_of_single_models():
    task, query = _task(), _query()
    cfg = _cfg(proj_dim=16, num_models=2)
    ens = _scores(task, query, cfg)
    params = [task.params, task.retrain(jax.random.key(cfg.seed + 1))]
    feats = grad.trak_features(task, None, 16, 5, True)

    def single(m, p):
        key = projections.projection_key(cfg.seed, m)
        phi_NxK, w_N = feats(p, key, task.arrays(task.train))
        w_NxK = projections.kernel_weights(phi_NxK, w_N, cfg.damping, "absolute")
        return np.asarray(feats(p, key, task.arrays(query))[0] @ w_NxK.T)

    singles = [single(m, p) for m, p in enumerate(params)]
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
    scores = _scores(task, query, cfg)
    ranks = (scores > scores[np.arange(5), np.arange(5)][:, None]).sum(1)
    assert (ranks == 0).all(), ranks
    assert (scores[np.arange(5), np.arange(5)] > 0).all()


def test_logra_on_a_classifier_projects_the_explicit_layer_gradients():
    """LoGRA on the MLP: per layer P_in^T [kernel grad; bias grad] P_out (bias as an input
    column of ones), against jax.grad of the per-example loss."""
    task = _task(hidden=(4,))
    cfg = grad.default_config("logra", "classifier")
    cfg.update(rank_in=3, rank_out=2, chunk=5)
    layers = task.dense_layers(cfg)
    assert layers == ("layers/0", "head")
    projs = grad.logra_projections(task, layers, cfg)
    phi = np.asarray(
        grad.logra_features(task, layers, 5)(task.params, projs, task.arrays(task.train))
    )

    def loss(p, x, y):
        return mlp.cross_entropy(mlp.apply(task.graphdef, p, x[None]), y[None])[0]

    g = jax.vmap(jax.grad(loss), (None, 0, 0))(task.params, task.train.x_NxF, task.train.y_N)
    g = nnx.to_pure_dict(g)
    want = []
    for layer, (p_in, p_out) in zip([g["layers"][0], g["head"]], projs, strict=True):
        G = np.concatenate([layer["kernel"], layer["bias"][:, None]], axis=1)  # N x (I+1) x O
        want.append(np.einsum("ia,nio,ob->nab", p_in, G, p_out).reshape(len(G), -1))
    want = np.concatenate(want, axis=1)
    np.testing.assert_allclose(phi, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    scores = methods.get("logra").score(task, methods.get("logra").fit(task, cfg), _query(), cfg)
    assert scores.shape == (4, 12) and np.isfinite(scores).all()


def test_relative_damping_is_scaled_by_the_mean_gram_eigenvalue():
    phi = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    lam = projections.ridge(phi, 0.5, "relative")
    np.testing.assert_allclose(lam, 0.5 * np.trace(phi.T @ phi) / 3, rtol=1e-6)
    assert projections.ridge(phi, 0.5, "absolute") == 0.5
    with pytest.raises(ConfigError, match="damping_mode"):
        projections.ridge(phi, 0.5, "nope")
