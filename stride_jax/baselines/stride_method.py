"""STRIDE behind the common method interface (the classifier logit hook)."""

from __future__ import annotations

import os

from stride_jax import pipeline
from stride_jax.baselines.base import Task, register
from stride_jax.operators import LogitHook


def hook(task: Task) -> LogitHook:
    """The classifier hook: the task model's penultimate features and logits."""
    return LogitHook(task.features, task.logits)


def fit(task: Task, cfg):
    workdir = os.path.join(task.workdir, "stride") if task.workdir else None
    return pipeline.fit(hook(task), task.train, cfg, mesh=task.mesh, workdir=workdir)


def score(task: Task, state, query, cfg):
    out = pipeline.score(hook(task), state, query, cfg, mesh=task.mesh)
    return out.scores_QxN


register("stride", fit, score)
