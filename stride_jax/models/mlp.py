"""MLP classifier (Flax NNX) and its one training recipe.

The recipe (full-batch AdamW for a fixed number of steps, weight decay) is used identically
for the base model and for every ground-truth retrain; only the per-example weights differ
(1 for kept examples, 0 for dropped ones). Full-batch steps make a retrain a pure function
of (init key, kept mask), so ``jax.vmap`` over models equals training them one by one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class MLP(nnx.Module):
    """x -> [Linear -> GELU] * len(hidden) -> Linear (logits).

    ``features`` returns the last hidden activations (the steering operators' input).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], num_classes: int, *, rngs: nnx.Rngs):
        dims = [in_dim, *hidden]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(dims)])
        self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

    def features(self, x_BxF: jax.Array) -> jax.Array:
        h = x_BxF
        for layer in self.layers:
            h = jax.nn.gelu(layer(h))
        return h

    def __call__(self, x_BxF: jax.Array) -> jax.Array:
        return self.head(self.features(x_BxF))


def build(config, in_dim: int, num_classes: int, key: jax.Array) -> MLP:
    return MLP(in_dim, tuple(config.hidden), num_classes, rngs=nnx.Rngs(params=key))


def abstract(config, in_dim: int, num_classes: int):
    """(graphdef, abstract params) without allocating: for restores and pure functions."""
    model = nnx.eval_shape(lambda: build(config, in_dim, num_classes, jax.random.key(0)))
    return nnx.split(model, nnx.Param)


def apply(graphdef, params, x_BxF: jax.Array) -> jax.Array:
    """Logits of the model (graphdef, params) on a batch."""
    return nnx.merge(graphdef, params)(x_BxF)


def apply_features(graphdef, params, x_BxF: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params).features(x_BxF)


def cross_entropy(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
    """Per-example cross-entropy (natural log)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, y_B)


def fit(config, key: jax.Array, x_NxF, y_N, weight_N, num_classes: int):
    """Train one MLP with the recipe in ``config``; returns its params (an ``nnx.State``).

    Pure and jittable; vmap it over ``key`` and ``weight_N`` to train many models at once.
    Loss: weighted mean cross-entropy over examples with weight_N (0/1 masks in practice).
    """
    graphdef, params = nnx.split(build(config, x_NxF.shape[1], num_classes, key), nnx.Param)
    schedule = optax.cosine_decay_schedule(config.lr, config.steps)
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    opt_state = tx.init(params)
    denom = jnp.maximum(weight_N.sum(), 1.0)

    def loss_fn(p):
        ce = cross_entropy(apply(graphdef, p, x_NxF), y_N)
        return (ce * weight_N).sum() / denom

    def step(carry, _):
        p, s = carry
        grads = jax.grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), None, length=config.steps)
    return params
