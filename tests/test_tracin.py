"""TracIn and the base model's trajectory against plain Python loops."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from stride_jax import methods
from stride_jax.data import Dataset
from stride_jax.errors import ConfigError
from stride_jax.methods import grad as grad_methods
from stride_jax.models import mlp
from stride_jax.tasks import ClassifierTask

CFG = ml_collections.ConfigDict(dict(hidden=(4,), steps=20, lr=3e-2, weight_decay=1e-2, seed=3))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return Dataset(x, rng.integers(0, 3, n).astype(np.int32), np.arange(n))


def _task(train, key_seed=CFG.seed):
    x, y = jnp.asarray(train.x_NxF), jnp.asarray(train.y_N)
    fit = jax.jit(lambda k: mlp.fit(CFG, k, x, y, jnp.ones(len(y)), 3))
    graphdef, _ = mlp.abstract(CFG, 5, 3)
    return ClassifierTask(
        graphdef=graphdef,
        params=fit(jax.random.key(key_seed)),
        train=train,
        num_classes=3,
        logits_fn=mlp.apply,
        model_config=CFG,
    )


def test_trajectory_replays_fit():
    train = _data(12, 0)
    x, y, w = jnp.asarray(train.x_NxF), jnp.asarray(train.y_N), jnp.ones(12)
    key = jax.random.key(CFG.seed)
    params = jax.jit(lambda k: mlp.fit(CFG, k, x, y, w, 3))(key)
    final, ckpts, lr_C = jax.jit(lambda k: mlp.fit_trajectory(CFG, k, x, y, w, 3, 3))(key)
    leaves = jax.tree.leaves
    for a, b, c in zip(leaves(params), leaves(final), leaves(ckpts), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c[-1]))
    # Independent replay: a Python loop of AdamW updates, params saved after 7, 13, 20 updates.
    ends = [7, 13, 20]
    np.testing.assert_array_equal(mlp.checkpoint_steps(20, 3), ends)
    graphdef, p = nnx.split(mlp.build(CFG, 5, 3, key), nnx.Param)
    tx = optax.adamw(optax.cosine_decay_schedule(CFG.lr, CFG.steps), weight_decay=CFG.weight_decay)
    s = tx.init(p)

    @jax.jit
    def update(p, s):
        g = jax.grad(lambda q: mlp.cross_entropy(mlp.apply(graphdef, q, x), y).mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    saved = []
    for t in range(CFG.steps):
        p, s = update(p, s)
        if t + 1 in ends:
            saved.append(ravel_pytree(p)[0])
    for c in range(3):
        got = ravel_pytree(jax.tree.map(lambda a, c=c: a[c], ckpts))[0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(saved[c]), atol=1e-6)
    sched = [CFG.lr * 0.5 * (1 + np.cos(np.pi * t / CFG.steps)) for t in range(CFG.steps)]
    want = [np.mean(sched[a:b]) for a, b in zip([0, 7, 13], ends, strict=True)]
    np.testing.assert_allclose(np.asarray(lr_C), want, rtol=1e-5)


def test_scores_match_python_loop():
    train, query = _data(12, 0), _data(3, 1)
    task = _task(train)
    cfg = grad_methods.default_config("tracin", "classifier")
    cfg.update(num_checkpoints=3, chunk=5)
    method = methods.get("tracin", "classifier")
    state = method.fit(task, cfg)
    got = method.score(task, state, query, cfg)

    @jax.jit
    def grad(p, x, y):
        def loss(q):
            return -jax.nn.log_softmax(mlp.apply(task.graphdef, q, x[None])[0])[y]

        return ravel_pytree(jax.grad(loss)(p))[0]

    want = np.zeros((3, 12))
    for c in range(3):
        p = state["ckpts"][c]
        g_tr = [
            np.asarray(grad(p, xi, yi), np.float64)
            for xi, yi in zip(train.x_NxF, train.y_N, strict=True)
        ]
        for q in range(3):
            g_q = np.asarray(grad(p, query.x_NxF[q], query.y_N[q]), np.float64)
            for i in range(12):
                want[q, i] += float(state["lr_C"][c]) * g_q @ g_tr[i]
    assert got.shape == (3, 12) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_fit_rejects_params_from_another_recipe():
    task = _task(_data(12, 0), key_seed=CFG.seed + 1)
    tracin = methods.get("tracin", "classifier")
    with pytest.raises(ConfigError, match="does not reproduce"):
        tracin.fit(task, grad_methods.default_config("tracin", "classifier"))


def test_trajectory_needs_the_mlp_recipe():
    task = _task(_data(12, 0))
    task.model_config = None
    with pytest.raises(ConfigError, match="trajectory"):
        methods.get("tracin", "classifier").fit(
            task, grad_methods.default_config("tracin", "classifier")
        )
