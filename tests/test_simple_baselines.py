"""Simple baselines (graddot, gradcos, featsim, random) against plain numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from stride_jax.baselines import base, graddot, simple
from stride_jax.data import Dataset, load_digits
from stride_jax.models import mlp


@pytest.fixture(scope="module")
def task():
    c = tiny_config()
    splits = load_digits(n_train=60, n_query=6)
    x, y = jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N)
    params = mlp.fit(c.model, jax.random.key(0), x, y, jnp.ones(60), splits.num_classes)
    graphdef, _ = mlp.abstract(c.model, x.shape[1], splits.num_classes)
    t = base.Task(c.model, graphdef, params, splits.train, splits.num_classes)
    return t, splits.query


def _run(name, task, query, **overrides):
    method = base.get(name)
    cfg = simple.default_config(name)
    cfg.update(overrides)
    out = method.score(task, method.fit(task, cfg), query, cfg)
    assert out.dtype == np.float32 and out.shape == (len(query), len(task.train))
    return out


def test_registered():
    for name in ("graddot", "gradcos", "featsim", "random"):
        assert base.get(name).name == name


def test_featsim_equals_numpy_cosine(task):
    t, q = task
    got = _run("featsim", t, q, chunk=16)  # chunked forward passes
    f_tr = np.asarray(t.features(jnp.asarray(t.train.x_NxF)), np.float64)
    f_q = np.asarray(t.features(jnp.asarray(q.x_NxF)), np.float64)
    want = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in f_tr] for a in f_q])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_gradcos_is_graddot_over_norms(task):
    t, q = task
    dot = _run("graddot", t, q, chunk=7)
    cos = _run("gradcos", t, q, chunk=7)
    g_tr = np.asarray(graddot.per_example_grads(t.graphdef, t.params, t.train.x_NxF, t.train.y_N))
    g_q = np.asarray(graddot.per_example_grads(t.graphdef, t.params, q.x_NxF, q.y_N))
    np.testing.assert_allclose(dot, g_q @ g_tr.T, rtol=1e-4, atol=1e-6)
    norms = np.linalg.norm(g_q, axis=1)[:, None] * np.linalg.norm(g_tr, axis=1)[None, :]
    np.testing.assert_allclose(cos, dot / norms, rtol=1e-4, atol=1e-6)
    assert np.abs(cos).max() <= 1 + 1e-5


def test_graddot_identical_example_helps(task):
    t, _ = task
    idx = np.array([3, 17, 42])
    query = Dataset(t.train.x_NxF[idx], t.train.y_N[idx], np.arange(3))
    for name in ("graddot", "gradcos"):
        s = _run(name, t, query)
        assert (s[np.arange(3), idx] > 0).all()
    cos = _run("gradcos", t, query)
    np.testing.assert_allclose(cos[np.arange(3), idx], 1.0, atol=1e-4)


def test_random_deterministic_given_seed(task):
    t, q = task
    a, b = _run("random", t, q, seed=5), _run("random", t, q, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _run("random", t, q, seed=6))
    big = _run("random", t, Dataset(t.train.x_NxF, t.train.y_N, t.train.ids_N), seed=0)
    assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05


def test_unknown_default_config():
    with pytest.raises(ValueError, match="unknown simple baseline"):
        simple.default_config("nope")
