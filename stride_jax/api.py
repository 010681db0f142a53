"""The public entry point: scores of any registered method for any task.

task = stride_jax.tasks.classifier(model, train=(x, y), queries=(xq, yq), retrain=...)
scores_QxE = stride_jax.attribute(task, method="stride")
stride_jax.evaluate.lds(task, scores_QxE, num_models=50)
"""

from __future__ import annotations

import ml_collections
import numpy as np

from stride_jax import methods
from stride_jax.errors import ConfigError
from stride_jax.task import Task


def method_config(task: Task, method: str, config=None) -> ml_collections.ConfigDict:
    """``method``'s defaults for ``task``'s kind, with ``config`` (a dict or ConfigDict, nested
    like the defaults) applied on top; a key the defaults lack is refused by name."""
    cfg = methods.get(method, task.kind).default_config(task.kind)
    if config is None:
        return cfg
    overrides = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    _apply(cfg, dict(overrides), method)
    return cfg


def _apply(cfg, overrides: dict, where: str) -> None:
    for key, value in overrides.items():
        if key not in cfg:
            raise ConfigError(f"unknown {where} config key {key!r}; known: {sorted(cfg.keys())}")
        if isinstance(cfg[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _apply(cfg[key], value, f"{where}.{key}")
        else:
            cfg[key] = value


def attribute(task: Task, method: str = "stride", config=None, *, queries=None) -> np.ndarray:
    """Scores (queries x training examples, float32; higher = the example helps, i.e. lowers
    the query's loss) of ``method`` on ``task``'s query rows (or ``queries``, rows of the same
    kind). ``config`` overrides the method's defaults for the task kind
    (``stride_jax.methods.get(method).default_config(kind)`` lists them)."""
    if not isinstance(task, Task):
        raise TypeError(
            f"task must be a stride_jax.task.Task (build one with stride_jax.tasks.classifier "
            f"or stride_jax.tasks.decoder), got {type(task).__name__}"
        )
    m = methods.get(method, task.kind)
    cfg = method_config(task, method, config)
    queries = task.query if queries is None else queries
    if queries is None or len(queries) == 0:
        raise ValueError("attribute needs at least one query row")
    state = m.fit(task, cfg)
    rows = methods.as_scores(m.score(task, state, queries, cfg))
    return task.sum_to_examples(rows).astype(np.float32)
