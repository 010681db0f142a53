"""One registry of attribution methods, each written once against the task protocol.

A method is registered under a name with

- ``fit(task, cfg) -> state``: the query-independent work (training-row gradients,
  projections, curvature, trained operators...);
- ``score(task, state, query_rows, cfg) -> scores_QxN``: one row per query row, one column per
  training ROW (``task.sum_to_examples`` adds rows up to examples); higher = the training row
  HELPS (lowers) the query's loss;
- ``default_config(kind) -> ConfigDict``: its settings for a task kind ("classifier",
  "decoder"); defaults may differ by kind (they are tuned per benchmark);
- ``kinds``: the task kinds it supports. Asking for a method on another kind raises
  ``ConfigError`` naming both.

Method modules register themselves when imported; ``load()`` imports them all (lazily: the
text-similarity and embedding baselines pull in scikit-learn and tokenizers only then).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from stride_jax.errors import ConfigError
from stride_jax.task import KINDS

# Modules whose import registers methods (order = registration order).
MODULES = (
    "stride_jax.stride.method",
    "stride_jax.stride.opspace",
    "stride_jax.methods.similarity",
    "stride_jax.methods.simple",
    "stride_jax.methods.datamodel",
    "stride_jax.methods.grad",
    "stride_jax.methods.influence",
)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fit: Callable
    score: Callable
    default_config: Callable
    kinds: tuple[str, ...] = KINDS


REGISTRY: dict[str, Method] = {}


def register(name: str, fit, score, *, default_config, kinds=KINDS) -> None:
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"method {name!r}: unknown task kinds {sorted(unknown)}")
    REGISTRY[name] = Method(name, fit, score, default_config, tuple(kinds))


def load() -> dict[str, Method]:
    """Import every method module (registering them); returns the registry."""
    for module in MODULES:
        importlib.import_module(module)
    return REGISTRY


def names(kind: str | None = None) -> list[str]:
    """Registered method names (those supporting ``kind`` when given), sorted."""
    return sorted(n for n, m in load().items() if kind is None or kind in m.kinds)


def get(name: str, kind: str | None = None) -> Method:
    """The method ``name``; refuses an unknown name, or one that does not support ``kind``."""
    registry = load()
    if name not in registry:
        raise ConfigError(f"unknown attribution method {name!r}; known: {names()}")
    method = registry[name]
    if kind is not None and kind not in method.kinds:
        raise ConfigError(
            f"method {name!r} supports {' and '.join(method.kinds)} tasks, not {kind} tasks; "
            f"methods for {kind} tasks: {names(kind)}"
        )
    return method


def default_configs(kind: str) -> ml_collections.ConfigDict:
    """``{name: default config}`` of every method for ``kind`` but STRIDE (whose block is
    ``config.stride``)."""
    return ml_collections.ConfigDict(
        {n: get(n).default_config(kind) for n in names(kind) if n != "stride"}
    )


def as_scores(scores_QxN) -> np.ndarray:
    """Host float32 copy, checked finite (a NaN score silently ruins every metric)."""
    out = np.asarray(jax.device_get(scores_QxN), np.float32)
    if not np.isfinite(out).all():
        raise FloatingPointError("attribution scores contain NaN or inf")
    return out
