"""One small interface for every attribution method (STRIDE included).

A method is a pair of functions registered under a name:

- ``fit(task, cfg) -> state``: everything that does not depend on the queries (per-example
  training gradients, projections, curvature, trained operators...).
- ``score(task, state, query, cfg) -> scores_QxN``: float32 numpy, one row per query; a higher
  score means the training example HELPS (lowers) the query's loss.

``task`` bundles the frozen base model and the training data; ``cfg`` is the method's own
``ml_collections`` block. Training examples are processed in chunks (``cfg.chunk`` where it
applies) so memory stays bounded however large N is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.data import Dataset
from stride_jax.models import mlp


@dataclasses.dataclass
class Task:
    """The trained base model (an ``mlp.MLP``: graphdef + params), its recipe and the data."""

    model_config: object
    graphdef: object
    params: object
    train: Dataset
    num_classes: int
    mesh: object = None
    workdir: str | None = None
    seed: int = 0

    def logits(self, x_BxF, params=None) -> jax.Array:
        return mlp.apply(self.graphdef, self.params if params is None else params, x_BxF)

    def features(self, x_BxF, params=None) -> jax.Array:
        return mlp.apply_features(self.graphdef, self.params if params is None else params, x_BxF)

    def retrain(self, key, weight_N=None):
        """Params of a model trained with the base recipe (own init key; optional 0/1 mask)."""
        x, y = jnp.asarray(self.train.x_NxF), jnp.asarray(self.train.y_N)
        w = jnp.ones(len(self.train)) if weight_N is None else jnp.asarray(weight_N, jnp.float32)
        return mlp.jitted_fit(self.model_config, self.num_classes)(key, x, y, w)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fit: Callable
    score: Callable


REGISTRY: dict[str, Method] = {}


def register(name: str, fit: Callable, score: Callable) -> None:
    REGISTRY[name] = Method(name, fit, score)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown attribution method {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def as_scores(scores_QxN) -> np.ndarray:
    """Host float32 copy, checked finite (a NaN score silently ruins every metric)."""
    out = np.asarray(jax.device_get(scores_QxN), np.float32)
    if not np.isfinite(out).all():
        raise FloatingPointError("attribution scores contain NaN or inf")
    return out


@dataclasses.dataclass
class LMTask:
    """A frozen decoder (``transformer.Decoder`` graphdef + params), its recipe and the data.

    ``train`` is a ``TokenBlocks`` (rows = blocks / chunks); ``recipe`` is the
    ``lm_train`` config that made ``params`` from ``params0`` (random init for pre-training,
    the pre-trained model for SFT): ``params == lm_train.fit(recipe, graphdef, params0,
    jax.random.key(seed), task.data(), ones)``, so the trajectory can be replayed (TracIn) and
    ``retrain`` reproduces the recipe on a weighted subset. ``tokenizer`` decodes rows to text
    (text-similarity baselines).
    """

    model_config: object
    graphdef: object
    params: object
    train: object
    recipe: object
    params0: object
    tokenizer: object = None
    mesh: object = None
    workdir: str | None = None
    seed: int = 0

    def retrain(self, key, weight_N=None):
        """Params trained with the base recipe from ``params0`` (optional row weights)."""
        from stride_jax.models import lm_train

        w = jnp.ones(len(self.train)) if weight_N is None else jnp.asarray(weight_N, jnp.float32)
        return lm_train.jitted_fit(self.recipe, self.graphdef)(self.params0, key, self.data(), w)

    def data(self, blocks=None) -> dict:
        from stride_jax.models import lm_train

        return lm_train.data_arrays(self.train if blocks is None else blocks)

    def row_losses(self, blocks, params=None, batch: int = 64) -> jax.Array:
        """Mean target-token CE of every row of ``blocks`` under ``params`` (default: base)."""
        from stride_jax.models import lm_train

        data = self.data(blocks)
        fn = jax.jit(
            lambda p, d: jax.lax.map(
                lambda r: lm_train.example_losses(
                    self.graphdef, p, r["tokens"][None], r["attn"][None], r["loss_mask"][None]
                )[0],
                d,
                batch_size=batch,
            )
        )
        return fn(self.params if params is None else params, data)


LM_REGISTRY: dict[str, Method] = {}


def register_lm(name: str, fit: Callable, score: Callable) -> None:
    """Register a language-model method: ``fit(task, cfg)``, ``score(task, state, blocks, cfg)``."""
    LM_REGISTRY[name] = Method(name, fit, score)


def get_lm(name: str) -> Method:
    if name not in LM_REGISTRY:
        raise ValueError(
            f"unknown language-model attribution method {name!r}; known: {sorted(LM_REGISTRY)}"
        )
    return LM_REGISTRY[name]
