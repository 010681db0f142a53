"""Simple baselines (graddot, gradcos, featsim, random) against plain numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from jax.flatten_util import ravel_pytree

from stride_jax import methods, tasks
from stride_jax.data import Dataset, load_digits
from stride_jax.errors import ConfigError
from stride_jax.models import mlp


@pytest.fixture(scope="module")
def task():
    c = tiny_config()
    splits = load_digits(n_train=60, n_query=6)
    x, y = jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N)
    params = mlp.fit(c.model, jax.random.key(0), x, y, jnp.ones(60), splits.num_classes)
    graphdef, _ = mlp.abstract(c.model, x.shape[1], splits.num_classes)
    t = tasks.ClassifierTask(
        graphdef=graphdef, params=params, train=splits.train, num_classes=splits.num_classes
    )
    return t, splits.query


@pytest.fixture(scope="module")
def clf_task(task):
    """The same model and rows as a ``tasks.ClassifierTask`` (the new method registry)."""
    t, q = task
    new = tasks.ClassifierTask(
        graphdef=t.graphdef,
        params=t.params,
        train=t.train,
        query=q,
        num_classes=t.num_classes,
        logits_fn=mlp.apply,
        features_fn=mlp.apply_features,
    )
    return new, q


def _run_new(name, task, query, **overrides):
    method = methods.get(name, task.kind)
    cfg = method.default_config(task.kind)
    cfg.update(overrides)
    out = method.score(task, method.fit(task, cfg), query, cfg)
    assert out.dtype == np.float32 and out.shape == (len(query), len(task.train))
    return out


def test_registered():
    for name in ("graddot", "gradcos", "featsim", "random"):
        assert "classifier" in methods.get(name).kinds


def test_featsim_equals_numpy_cosine(clf_task):
    t, q = clf_task
    got = _run_new("featsim", t, q, chunk=16)  # chunked forward passes
    f_tr = np.asarray(t.features(jnp.asarray(t.train.x_NxF)), np.float64)
    f_q = np.asarray(t.features(jnp.asarray(q.x_NxF)), np.float64)
    want = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in f_tr] for a in f_q])
    np.testing.assert_allclose(got, want, atol=1e-5)


def _loop_grads(t, ds):
    """N x P: per-example cross-entropy gradients by a Python loop of jax.grad."""

    @jax.jit
    def grad(x, y):
        loss = lambda p: -jax.nn.log_softmax(mlp.apply(t.graphdef, p, x[None])[0])[y]  # noqa: E731
        return ravel_pytree(jax.grad(loss)(t.params))[0]

    return np.stack([np.asarray(grad(x, y)) for x, y in zip(ds.x_NxF, ds.y_N, strict=True)])


def test_gradcos_is_graddot_over_norms(clf_task):
    t, q = clf_task
    dot = _run_new("graddot", t, q, chunk=7)
    cos = _run_new("gradcos", t, q, chunk=7)
    g_tr, g_q = _loop_grads(t, t.train), _loop_grads(t, q)
    np.testing.assert_allclose(dot, g_q @ g_tr.T, rtol=1e-4, atol=1e-6)
    norms = np.linalg.norm(g_q, axis=1)[:, None] * np.linalg.norm(g_tr, axis=1)[None, :]
    np.testing.assert_allclose(cos, dot / norms, rtol=1e-4, atol=1e-6)
    assert np.abs(cos).max() <= 1 + 1e-5


def test_graddot_identical_example_helps(clf_task):
    t, _ = clf_task
    idx = np.array([3, 17, 42])
    query = Dataset(t.train.x_NxF[idx], t.train.y_N[idx], np.arange(3))
    for name in ("graddot", "gradcos"):
        s = _run_new(name, t, query)
        assert (s[np.arange(3), idx] > 0).all()
    cos = _run_new("gradcos", t, query)
    np.testing.assert_allclose(cos[np.arange(3), idx], 1.0, atol=1e-4)


def test_random_deterministic_given_seed(clf_task):
    t, q = clf_task
    a, b = _run_new("random", t, q, seed=5), _run_new("random", t, q, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _run_new("random", t, q, seed=6))
    big = _run_new("random", t, Dataset(t.train.x_NxF, t.train.y_N, t.train.ids_N), seed=0)
    assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown attribution method"):
        methods.get("nope")
