"""``"random"``: i.i.d. standard normal scores, the floor any method must beat (every kind).

Config (``default_config(kind)``): ``seed=0``. The scores are a pure function of
(seed, query rows Q, training rows N): ``jax.random.normal(jax.random.key(seed), (Q, N))``,
the same draw the classifier and decoder versions made before they were merged.
"""

from __future__ import annotations

import jax
import ml_collections

from stride_jax import methods


def default_config(kind: str | None = None) -> ml_collections.ConfigDict:
    del kind
    return ml_collections.ConfigDict(dict(seed=0))


def fit(task, cfg):
    """Nothing to fit."""
    return {}


def score(task, state, query, cfg=None):
    cfg = default_config() if cfg is None else cfg
    shape_QxN = (len(query), len(task.train))
    return methods.as_scores(jax.random.normal(jax.random.key(int(cfg.seed)), shape_QxN))


methods.register("random", fit, score, default_config=default_config)
