"""MLP classifier (Flax NNX) and its one training recipe.

The recipe (full-batch AdamW for a fixed number of steps, weight decay) is used identically
for the base model and for every ground-truth retrain; only the per-example weights differ
(1 for kept examples, 0 for dropped ones). Full-batch steps make a retrain a pure function
of (init key, kept mask), so ``jax.vmap`` over models equals training them one by one.
Above ``resources.MLP_ROW_CHUNK`` training rows the full-batch gradient is summed over row
chunks, so one retrain's memory does not grow with the data.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from stride_jax.resources import MLP_ROW_CHUNK


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


def hidden_site(graphdef, params, x_BxF: jax.Array) -> dict[str, jax.Array]:
    """The activations ``HiddenHook`` caches: ``u`` (the last hidden layer's input), ``a`` (its
    pre-activation), ``h = gelu(a)`` (the penultimate features) and ``logits``."""
    model = nnx.merge(graphdef, params)
    if not len(model.layers):
        raise ValueError("the MLP has no hidden layer to hook (config.model.hidden is empty)")
    u = x_BxF
    for layer in model.layers[:-1]:
        u = jax.nn.gelu(layer(u))
    a = model.layers[-1](u)
    h = jax.nn.gelu(a)
    return {"u": u, "a": a, "h": h, "logits": model.head(h)}


def head_weights(params) -> dict[str, jax.Array]:
    """The output layer's kernel as ``HiddenHook`` needs it: ``{"w_head": H x C}``."""
    return {"w_head": jnp.asarray(params["head"]["kernel"][...])}


def cross_entropy(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
    """Per-example cross-entropy (natural log)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, y_B)


def checkpoint_steps(steps: int, num_checkpoints: int) -> np.ndarray:
    """Evenly spaced update counts ``ends_C`` (the last is ``steps``): checkpoint c holds the
    params after ``ends_C[c]`` updates."""
    if not 1 <= num_checkpoints <= steps:
        raise ValueError(
            f"num_checkpoints must be in 1..{steps} (model steps), got {num_checkpoints}"
        )
    return np.round(np.arange(1, num_checkpoints + 1) * steps / num_checkpoints).astype(int)


def _train(config, key, x_NxF, y_N, weight_N, num_classes: int, num_checkpoints: int = 0):
    """The one recipe behind ``fit`` and ``fit_trajectory``: (final params, stacked checkpoints
    or None, learning rates lr_C or None)."""
    graphdef, params = nnx.split(build(config, x_NxF.shape[1], num_classes, key), nnx.Param)
    schedule = optax.cosine_decay_schedule(config.lr, config.steps)
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    opt_state = tx.init(params)
    denom = jnp.maximum(weight_N.sum(), 1.0)
    grad_fn = _full_batch_grad(graphdef, x_NxF, y_N, weight_N, denom)

    def update(p, s):
        grads = grad_fn(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    if not num_checkpoints:

        def step(carry, _):
            return update(*carry), None

        (params, _), _ = jax.lax.scan(step, (params, opt_state), None, length=config.steps)
        return params, None, None

    ends_C = checkpoint_steps(config.steps, num_checkpoints)
    slot_T = np.full(config.steps, -1, np.int32)
    slot_T[ends_C - 1] = np.arange(num_checkpoints)
    buf = jax.tree.map(lambda a: jnp.zeros((num_checkpoints, *a.shape), a.dtype), params)

    def store(b, p, slot):
        return jax.tree.map(lambda bb, pp: bb.at[slot].set(pp), b, p)

    def step_ckpt(carry, slot):
        p, s, b = carry
        p, s = update(p, s)
        b = jax.lax.cond(slot >= 0, store, lambda b, p, slot: b, b, p, slot)
        return (p, s, b), None

    (params, _, buf), _ = jax.lax.scan(step_ckpt, (params, opt_state, buf), jnp.asarray(slot_T))
    # Update t (0-based) uses schedule(t); checkpoint c stands for updates [ends[c-1], ends[c]).
    starts_C = np.concatenate([[0], ends_C[:-1]])
    lr_C = jnp.stack(
        [jnp.mean(schedule(jnp.arange(a, b))) for a, b in zip(starts_C, ends_C, strict=True)]
    )
    return params, buf, lr_C


def _full_batch_grad(graphdef, x_NxF, y_N, w_N, denom, chunk: int = MLP_ROW_CHUNK):
    """``p -> grad of sum_n w_n CE_n(p) / denom``: in one pass up to ``chunk`` rows, else
    summed over chunks of ``chunk`` rows (zero-weight padding), so memory does not grow with
    N (the same gradient up to float rounding)."""

    def loss_fn(p, x, y, w):
        return (cross_entropy(apply(graphdef, p, x), y) * w).sum() / denom

    n = x_NxF.shape[0]
    if n <= chunk:
        return lambda p: jax.grad(loss_fn)(p, x_NxF, y_N, w_N)
    pad = (-n) % chunk
    x_CxBxF = jnp.pad(x_NxF, ((0, pad), (0, 0))).reshape(-1, chunk, x_NxF.shape[1])
    y_CxB = jnp.pad(y_N, (0, pad)).reshape(-1, chunk)
    w_CxB = jnp.pad(w_N, (0, pad)).reshape(-1, chunk)

    def grad_fn(p):
        def body(acc, part):
            g = jax.grad(loss_fn)(p, *part)
            return jax.tree.map(jnp.add, acc, g), None

        zeros = jax.tree.map(jnp.zeros_like, p)
        return jax.lax.scan(body, zeros, (x_CxBxF, y_CxB, w_CxB))[0]

    return grad_fn


def fit(config, key: jax.Array, x_NxF, y_N, weight_N, num_classes: int):
    """Train one MLP with the recipe in ``config``; returns its params (an ``nnx.State``).

    Pure and jittable; vmap it over ``key`` and ``weight_N`` to train many models at once.
    Loss: weighted mean cross-entropy over examples with weight_N (0/1 masks in practice).
    """
    return _train(config, key, x_NxF, y_N, weight_N, num_classes)[0]


def fit_trajectory(config, key, x_NxF, y_N, weight_N, num_classes: int, num_checkpoints: int):
    """``fit`` (same recipe, same final params) plus its trajectory, for TracIn.

    Returns ``(params, ckpts, lr_C)``: ``ckpts`` stacks on a leading axis of size C the params
    after ``checkpoint_steps(config.steps, C)`` updates (the last equals ``params``);
    ``lr_C[c]`` is the mean scheduled learning rate over the updates checkpoint c stands for
    (the segment ending at it: the cosine schedule is 0 at the final step itself).
    """
    return _train(config, key, x_NxF, y_N, weight_N, num_classes, num_checkpoints)


def jitted_fit(config, num_classes: int):
    """``fit`` jitted once per (recipe, classes): ``(key, x_NxF, y_N, weight_N) -> params``."""
    return _jitted_fit(config.to_json(), num_classes)


@functools.lru_cache(maxsize=8)
def _jitted_fit(config_json: str, num_classes: int):
    config = ml_collections.ConfigDict(json.loads(config_json))
    return jax.jit(lambda k, x, y, w: fit(config, k, x, y, w, num_classes))
