"""TRAK (Park et al. 2023) for the MLP classifier.

Per model m (model 0 = the task's base params, the others retrained with the base recipe from
``key(seed + m)``):

- output function: the multiclass margin f(z) = log p(y|x) - log(1 - p(y|x))
  = logit_y - logsumexp_{c != y} logit_c; per-example gradients g_NxP (vmap(grad), flattened);
- random projection phi = P^T g with P_PxK Gaussian / sqrt(K), generated on device from the
  model's projection key in blocks of ``ROWS`` parameter rows (block r from fold_in(key, r), so
  any block can be regenerated alone); ``proj_dim = 0`` means no projection (P = I);
- score(q, i) = phi_q^T (Phi^T Phi + lam I)^-1 phi_i * (1 - p_i), lam = ``damping`` (absolute,
  TRAK's ridge), p_i = the model's probability of training example i's label.

The state keeps W_NxK = diag(1 - p) Phi (Phi^T Phi + lam I)^-1 per model, solved in float64
(the Gram's conditioning, ~1e5 / lam, is beyond float32), through the N x N dual system when
N < K. The ensemble averages the per-model SCORE matrices (the common simplification; TRAK
averages the kernel-weighted features and the (1 - p) weights separately).

Sign: a positive score means example i raises the query's margin, i.e. lowers its loss (helps).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from stride_jax.baselines import base
from stride_jax.models import mlp

ROWS = 1024  # parameter rows per projection block (part of the projection's definition)


def default_config(name: str = "trak") -> ml_collections.ConfigDict:
    """``"trak"`` is TRAK-10 (10 models), ``"trak1"`` TRAK-1. ``damping`` is TRAK's absolute
    lam, chosen on digits' validation queries (TRAK-1 LDS 0.12 at 1e-3, 0.61 at 100, 0.64 at
    300, 0.61 at 1e3, 0.28 at 1e7; the Gram's eigenvalues span ~7e-4 to 7e4)."""
    return ml_collections.ConfigDict(
        dict(
            proj_dim=2048,
            damping=300.0,
            num_models=1 if name == "trak1" else 10,
            seed=100,
            chunk=256,
        )
    )


def margin(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
    """log p_y - log(1 - p_y) = logit_y - logsumexp over the other classes, shape B."""
    onehot = jax.nn.one_hot(y_B, logits_BxC.shape[-1], dtype=bool)
    own = jnp.sum(jnp.where(onehot, logits_BxC, 0.0), axis=-1)
    return own - jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, logits_BxC), axis=-1)


def margin_grads(graphdef, params, x_BxF, y_B) -> jax.Array:
    """Flattened per-example margin gradients g_BxP."""

    def f(p, x, y):
        return margin(mlp.apply(graphdef, p, x[None]), y[None])[0]

    return jax.vmap(lambda x, y: ravel_pytree(jax.grad(f)(params, x, y))[0])(x_BxF, y_B)


def projection_block(key: jax.Array, r, k: int) -> jax.Array:
    """Rows [r * ROWS, (r + 1) * ROWS) of the projection, ROWS x K (deterministic in key, r)."""
    return jax.random.normal(jax.random.fold_in(key, r), (ROWS, k)) / np.sqrt(k)


def projection(key: jax.Array, num_params: int, k: int) -> jax.Array:
    """The projection P_PxK, built block by block (``lax.map`` over block ids)."""
    nblocks = -(-num_params // ROWS)
    blocks = jax.lax.map(lambda r: projection_block(key, r, k), jnp.arange(nblocks))
    return blocks.reshape(nblocks * ROWS, k)[:num_params]


def projection_key(cfg, m: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(cfg.seed + m), 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "chunk"))
def features(graphdef, params, proj_key, x_BxF, y_B, k: int, chunk: int):
    """(phi_BxK projected margin gradients, p_B probability of the label); k = 0: no projection."""
    num_params = ravel_pytree(params)[0].shape[0]
    proj_PxK = None if k == 0 else projection(proj_key, num_params, k)

    def one(xy):
        g = margin_grads(graphdef, params, xy[0][None], xy[1][None])[0]
        return g if proj_PxK is None else g @ proj_PxK

    phi_BxK = jax.lax.map(one, (x_BxF, y_B), batch_size=chunk)
    logp_BxC = jax.nn.log_softmax(mlp.apply(graphdef, params, x_BxF))
    p_B = jnp.exp(jnp.take_along_axis(logp_BxC, y_B[:, None], axis=1)[:, 0])
    return phi_BxK, p_B


@jax.jit
def _kernel_weighted(phi_NxK, p_N, damping):
    """W_NxK = diag(1 - p) Phi (Phi^T Phi + lam I)^-1, float64 (call under enable_x64)."""
    phi = phi_NxK.astype(jnp.float64)
    n, k = phi.shape
    if n < k:  # Phi (Phi^T Phi + lam I)^-1 = (Phi Phi^T + lam I)^-1 Phi
        w = jax.scipy.linalg.solve(phi @ phi.T + damping * jnp.eye(n), phi, assume_a="pos")
    else:
        w = jax.scipy.linalg.solve(phi.T @ phi + damping * jnp.eye(k), phi.T, assume_a="pos").T
    return (w * (1.0 - p_N.astype(jnp.float64))[:, None]).astype(jnp.float32)


@dataclasses.dataclass
class ModelState:
    """One ensemble member: its params, projection key and W_NxK."""

    params: object
    proj_key: jax.Array
    w_NxK: jax.Array


def fit_one(task: base.Task, params, proj_key, cfg) -> ModelState:
    """Training features of one model, kernel-weighted and (1 - p)-reweighted."""
    phi_NxK, p_N = features(
        task.graphdef,
        params,
        proj_key,
        jnp.asarray(task.train.x_NxF),
        jnp.asarray(task.train.y_N),
        int(cfg.proj_dim),
        int(cfg.chunk),
    )
    with jax.enable_x64(True):
        w_NxK = _kernel_weighted(phi_NxK, p_N, jnp.float64(cfg.damping))
    return ModelState(params, proj_key, w_NxK)


def score_one(task: base.Task, state: ModelState, query, cfg) -> jax.Array:
    """scores_QxN of one model: phi_q^T W^T."""
    phi_QxK, _ = features(
        task.graphdef,
        state.params,
        state.proj_key,
        jnp.asarray(query.x_NxF),
        jnp.asarray(query.y_N),
        int(cfg.proj_dim),
        int(cfg.chunk),
    )
    return phi_QxK @ state.w_NxK.T


def fit(task: base.Task, cfg) -> list[ModelState]:
    states = []
    for m in range(int(cfg.num_models)):
        params = task.params if m == 0 else task.retrain(jax.random.key(cfg.seed + m))
        states.append(fit_one(task, params, projection_key(cfg, m), cfg))
    return states


def score(task: base.Task, state: list[ModelState], query, cfg) -> np.ndarray:
    total = sum(score_one(task, s, query, cfg) for s in state)
    return base.as_scores(total / len(state))


base.register("trak", fit, score)
base.register("trak1", fit, score)
