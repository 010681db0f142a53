"""Retraining many models in one vmapped call equals training them one by one."""

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax import sharding
from stride_jax.data import load_digits
from stride_jax.eval import groundtruth
from stride_jax.models import mlp
from stride_jax.stride import subsets


def test_vmapped_retraining_equals_sequential(tiny):
    splits = load_digits(n_train=80, n_query=10)
    x, y = jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N)
    masks = subsets.retention_masks(jax.random.key(0), 4, 80, 0.5)
    keys = jax.random.split(jax.random.key(1), 4)
    stacked = groundtruth.retrain_many(
        tiny.model, keys, x, y, masks, 10, sharding.make_mesh(), batch=2
    )
    losses = groundtruth.query_losses(
        tiny.model, stacked, jnp.asarray(splits.query.x_NxF), jnp.asarray(splits.query.y_N), 10
    )
    graphdef, _ = mlp.abstract(tiny.model, 64, 10)
    fit_one = jax.jit(lambda k, w: mlp.fit(tiny.model, k, x, y, w, 10))
    for m in range(4):
        single = fit_one(keys[m], jnp.asarray(masks[m], jnp.float32))
        for a, b in zip(
            jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(stacked), strict=True
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b[m]), atol=1e-5)
        logits = mlp.apply(graphdef, single, splits.query.x_NxF)
        np.testing.assert_allclose(
            np.asarray(mlp.cross_entropy(logits, splits.query.y_N)),
            np.asarray(losses[m]),
            atol=1e-5,
        )


def test_masked_training_ignores_dropped_examples(tiny):
    """A model trained with mask m equals one trained on only the kept rows."""
    splits = load_digits(n_train=60, n_query=10)
    x, y = splits.train.x_NxF, splits.train.y_N
    mask = np.zeros(60, bool)
    mask[::2] = True
    key = jax.random.key(3)
    masked = mlp.fit(tiny.model, key, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask, float), 10)
    subset = mlp.fit(
        tiny.model, key, jnp.asarray(x[mask]), jnp.asarray(y[mask]), jnp.ones(int(mask.sum())), 10
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(masked), jax.tree_util.tree_leaves(subset), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
