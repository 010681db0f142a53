"""STRIDE behind the common method interface (the classifier logit hook)."""

from __future__ import annotations

import os

from stride_jax import pipeline
from stride_jax.baselines.base import Task, register
from stride_jax.operators import LogitHook


def _hook(task: Task) -> LogitHook:
    return LogitHook(task.features, task.logits)


def fit(task: Task, cfg):
    workdir = os.path.join(task.workdir, "stride") if task.workdir else None
    return pipeline.fit(_hook(task), task.train, cfg, mesh=task.mesh, workdir=workdir)


def score(task: Task, state, query, cfg):
    out = pipeline.score(_hook(task), state, query, cfg, mesh=task.mesh)
    return out.scores_QxN


register("stride", fit, score)
