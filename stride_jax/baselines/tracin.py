"""TracIn-CP (Pruthi et al. 2020): score(q, i) = sum_c lr_c grad L(q; theta_c) . grad L(i; theta_c).

The checkpoints theta_c are the TASK's base-model trajectory: ``mlp.fit_trajectory`` replays the
base recipe from ``key(model_config.seed)`` with all-ones weights (how the benchmark trains the
base model) and ``fit`` checks that it ends at ``task.params``. ``lr_c`` is the mean scheduled
learning rate over the updates checkpoint c stands for (see ``mlp.fit_trajectory``).

The state holds only the C checkpoints; training gradients are recomputed per example chunk at
scoring time (``lax.map``), so memory stays at chunk x P. A positive score means a gradient step
on example i lowers the query's loss (helps). AdamW's preconditioning is ignored, as in TracIn.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stride_jax.baselines import base
from stride_jax.baselines.graddot import per_example_grads
from stride_jax.models import mlp


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(num_checkpoints=5, chunk=256))


@dataclasses.dataclass
class State:
    """Checkpoints stacked on a leading axis of size C, and lr_C."""

    ckpts: object
    lr_C: jax.Array


def fit(task: base.Task, cfg, atol: float = 1e-4) -> State:
    c = task.model_config
    x, y = jnp.asarray(task.train.x_NxF), jnp.asarray(task.train.y_N)
    traj = jax.jit(
        lambda k: mlp.fit_trajectory(
            c, k, x, y, jnp.ones(len(y)), task.num_classes, cfg.num_checkpoints
        )
    )
    final, ckpts, lr_C = traj(jax.random.key(c.seed))
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(task.params), strict=True)
    )
    if gap > atol:
        raise ValueError(
            f"TracIn: replaying the base recipe from key(model.seed={c.seed}) does not reproduce "
            f"the task's params (max |diff| {gap:.2e}); the trajectory would be another model's"
        )
    return State(ckpts, lr_C)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _scores(graphdef, ckpts, lr_C, x_tr, y_tr, x_q, y_q, chunk: int):
    def one_ckpt(acc_QxN, c):
        params = jax.tree.map(lambda a: a[c], ckpts)
        g_QxP = per_example_grads(graphdef, params, x_q, y_q)

        def one(xy):
            return g_QxP @ per_example_grads(graphdef, params, xy[0][None], xy[1][None])[0]

        dots_NxQ = jax.lax.map(one, (x_tr, y_tr), batch_size=chunk)
        return acc_QxN + lr_C[c] * dots_NxQ.T, None

    init = jnp.zeros((x_q.shape[0], x_tr.shape[0]), jnp.float32)
    return jax.lax.scan(one_ckpt, init, jnp.arange(lr_C.shape[0]))[0]


def score(task: base.Task, state: State, query, cfg) -> np.ndarray:
    out = _scores(
        task.graphdef,
        state.ckpts,
        state.lr_C,
        jnp.asarray(task.train.x_NxF),
        jnp.asarray(task.train.y_N),
        jnp.asarray(query.x_NxF),
        jnp.asarray(query.y_N),
        int(cfg.chunk),
    )
    return base.as_scores(out)


base.register("tracin", fit, score)
