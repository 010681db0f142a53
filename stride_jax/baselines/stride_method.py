"""STRIDE behind the common method interface (classifier hooks: logits, or hidden + logits)."""

from __future__ import annotations

import os

from stride_jax import pipeline
from stride_jax.baselines.base import Task, register
from stride_jax.errors import ConfigError
from stride_jax.models import mlp
from stride_jax.operators import HiddenHook, LogitHook

HOOKS = ("logits", "hidden")


def hook(task: Task, cfg=None):
    """The classifier hook ``cfg.hook`` names: "logits" (penultimate features and logits, the
    paper's classifier variant) or "hidden" (also the MLP's last hidden pre-activation, with a
    ``cfg.hidden_rank`` basis of ``cfg.hidden_basis``: "whitened" or "pca" principal
    directions of the layer's input)."""
    kind = "logits" if cfg is None else cfg.hook
    if kind == "logits":
        return LogitHook(task.features, task.logits)
    if kind == "hidden":
        return HiddenHook(
            lambda x: mlp.hidden_site(task.graphdef, task.params, x),
            mlp.head_weights(task.params),
            cfg.hidden_rank,
            cfg.get("hidden_basis", "whitened"),
        )
    raise ConfigError(f"stride.hook must be one of {HOOKS}, got {kind!r}")


def fit(task: Task, cfg):
    workdir = os.path.join(task.workdir, "stride") if task.workdir else None
    return pipeline.fit(hook(task, cfg), task.train, cfg, mesh=task.mesh, workdir=workdir)


def score(task: Task, state, query, cfg):
    out = pipeline.score(hook(task, cfg), state, query, cfg, mesh=task.mesh)
    return out.scores_QxN


register("stride", fit, score)
