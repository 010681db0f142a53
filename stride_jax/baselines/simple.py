"""Cheap baselines in the method interface: GradDot, GradCos, FeatSim and Random.

Registered names and their config keys (``default_config(name)``):

- ``"graddot"``: ``grad L(q) . grad L(i)`` over all parameters (``baselines.graddot``).
  ``chunk=256``: training examples per ``lax.map`` step (memory ~ chunk x P).
- ``"gradcos"``: the same with both gradients normalised to unit length (cosine).
  ``chunk=256`` as above.
- ``"featsim"``: cosine similarity between the penultimate-layer features
  (``task.features``) of the query and of the training example; more similar = helps.
  ``chunk=4096``: examples per feature forward pass (fit and score).
- ``"random"``: i.i.d. standard normal scores, the floor any method must beat.
  ``seed=0``: the scores are a pure function of (seed, Q, N).

Every ``score`` returns float32 numpy ``scores_QxN`` (higher = helps the query).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stride_jax.baselines import base, graddot

_EPS = 1e-12

DEFAULTS = {
    "graddot": dict(chunk=256),
    "gradcos": dict(chunk=256),
    "featsim": dict(chunk=4096),
    "random": dict(seed=0),
}


def default_config(name: str) -> ml_collections.ConfigDict:
    """The default config block of one of this module's methods (see module docstring)."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown simple baseline {name!r}; known: {sorted(DEFAULTS)}")
    return ml_collections.ConfigDict(DEFAULTS[name])


def _cfg(name: str, cfg):
    return default_config(name) if cfg is None else cfg


# --- GradDot / GradCos -------------------------------------------------------------------


def _grad_fit(task, cfg):
    """Nothing is query-independent enough to be worth caching (P-sized rows per example)."""
    return {}


def _grad_score(normalize: bool):
    name = "gradcos" if normalize else "graddot"

    def score(task, state, query, cfg):
        cfg = _cfg(name, cfg)
        s = graddot.scores(
            task.graphdef,
            task.params,
            task.train,
            query,
            chunk=int(cfg.chunk),
            normalize=normalize,
        )
        return base.as_scores(s)

    return score


# --- FeatSim -------------------------------------------------------------------------------


def _unit_features(task, x_NxF, chunk: int) -> jax.Array:
    """Penultimate features of ``x`` (computed ``chunk`` rows at a time), unit-normalised."""
    fn = jax.jit(lambda x: task.features(x))
    x_NxF = np.asarray(x_NxF, np.float32)
    parts = [fn(jnp.asarray(x_NxF[i : i + chunk])) for i in range(0, x_NxF.shape[0], chunk)]
    f_NxH = jnp.concatenate(parts, axis=0)
    return f_NxH / jnp.maximum(jnp.linalg.norm(f_NxH, axis=1, keepdims=True), _EPS)


def _featsim_fit(task, cfg):
    cfg = _cfg("featsim", cfg)
    return {"train_unit_NxH": _unit_features(task, task.train.x_NxF, int(cfg.chunk))}


def _featsim_score(task, state, query, cfg):
    cfg = _cfg("featsim", cfg)
    q_QxH = _unit_features(task, query.x_NxF, int(cfg.chunk))
    s = jnp.matmul(q_QxH, state["train_unit_NxH"].T, precision=jax.lax.Precision.HIGHEST)
    return base.as_scores(s)


# --- Random --------------------------------------------------------------------------------


def _random_fit(task, cfg):
    return {}


def _random_score(task, state, query, cfg):
    cfg = _cfg("random", cfg)
    shape = (len(query), len(task.train))
    return base.as_scores(jax.random.normal(jax.random.key(int(cfg.seed)), shape))


base.register("graddot", _grad_fit, _grad_score(normalize=False))
base.register("gradcos", _grad_fit, _grad_score(normalize=True))
base.register("featsim", _featsim_fit, _featsim_score)
base.register("random", _random_fit, _random_score)
