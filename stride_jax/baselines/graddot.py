"""Gradient-dot baseline: score(q, i) = grad L(q) . grad L(i) over all model parameters.

A positive score means one gradient step on example i lowers the query's loss (helps).
Per-example gradients come from ``vmap(grad)``; training examples are processed in chunks
(``lax.map``) so memory stays at chunk x P however large N is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from stride_jax.models import mlp


def per_example_grads(graphdef, params, x_BxF, y_B) -> jax.Array:
    """Flattened per-example loss gradients, B x P."""

    def loss(p, x, y):
        return mlp.cross_entropy(mlp.apply(graphdef, p, x[None]), y[None])[0]

    def flat_grad(x, y):
        return ravel_pytree(jax.grad(loss)(params, x, y))[0]

    return jax.vmap(flat_grad)(x_BxF, y_B)


def scores(graphdef, params, train, query, chunk: int = 256, normalize: bool = False):
    """scores_QxN (float32); ``normalize`` gives the cosine variant (GradCos)."""

    @jax.jit
    def fn(x_tr, y_tr, x_q, y_q):
        g_q = per_example_grads(graphdef, params, x_q, y_q)
        if normalize:
            g_q = g_q / (jnp.linalg.norm(g_q, axis=1, keepdims=True) + 1e-12)

        def one(args):
            g = per_example_grads(graphdef, params, args[0][None], args[1][None])[0]
            if normalize:
                g = g / (jnp.linalg.norm(g) + 1e-12)
            return g_q @ g

        return jax.lax.map(one, (x_tr, y_tr), batch_size=chunk).T

    return fn(
        jnp.asarray(train.x_NxF),
        jnp.asarray(train.y_N),
        jnp.asarray(query.x_NxF),
        jnp.asarray(query.y_N),
    )
