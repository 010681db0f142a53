"""The classifier task: any Flax NNX module that maps a batch of features to logits.

``ClassifierTask`` holds the frozen model (graphdef + params), the training and query sets
(``data.Dataset``: ``x_NxF``, ``y_N``, ``ids_N``) and the recipe that retrains it. The MLP of
``models.mlp`` is one such model (``mlp_task``); a user's own module is wrapped by
``stride_jax.tasks.classifier``. Rows are examples; the loss is cross-entropy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.data import Dataset
from stride_jax.errors import ConfigError
from stride_jax.models.mlp import cross_entropy
from stride_jax.task import Task, as_weights


def margin(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
    """log p_y - log(1 - p_y) = logit_y - logsumexp over the other classes, shape B."""
    onehot = jax.nn.one_hot(y_B, logits_BxC.shape[-1], dtype=bool)
    own = jnp.sum(jnp.where(onehot, logits_BxC, 0.0), axis=-1)
    return own - jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, logits_BxC), axis=-1)


def default_logits(graphdef, params, x_BxF):
    return nnx.merge(graphdef, params)(x_BxF)


def default_features(graphdef, params, x_BxF):
    """The module's ``features(x)`` (penultimate activations); the logits when it has none."""
    model = nnx.merge(graphdef, params)
    return model.features(x_BxF) if hasattr(model, "features") else model(x_BxF)


@dataclasses.dataclass
class ClassifierTask(Task):
    """A frozen classifier and its data (see the module doc).

    ``logits_fn(graphdef, params, x_BxF) -> B x C`` and ``features_fn`` (penultimate features,
    where STRIDE's logit-site basis reads) default to calling the merged module and its
    ``features`` method. ``retrain_fn(key, x_NxF, y_N, weight_N) -> params`` is the recipe
    (None: methods that retrain refuse the task). ``model_config`` is the MLP recipe when the
    model is ``models.mlp.MLP`` (None otherwise).
    """

    kind = "classifier"

    num_classes: int = 0
    logits_fn: Callable = default_logits
    features_fn: Callable = default_features
    retrain_fn: Callable | None = None
    model_config: object = None

    # --- rows ------------------------------------------------------------------------------

    def arrays(self, rows: Dataset) -> dict:
        return {"x": jnp.asarray(rows.x_NxF, jnp.float32), "y": jnp.asarray(rows.y_N, jnp.int32)}

    def render(self, rows: Dataset, i: int):
        """The features of row i as an image (a square side, e.g. 8x8 digits) or a vector,
        with its label and id."""
        x = np.asarray(rows.x_NxF[i])
        side = int(round(np.sqrt(x.size)))
        image = x.reshape(side, side) if side * side == x.size else x
        return {"image": image, "label": int(rows.y_N[i]), "id": str(rows.ids_N[i])}

    # --- the model --------------------------------------------------------------------------

    def logits(self, x_BxF, params=None) -> jax.Array:
        return self.logits_fn(self.graphdef, self.params if params is None else params, x_BxF)

    def features(self, x_BxF, params=None) -> jax.Array:
        return self.features_fn(self.graphdef, self.params if params is None else params, x_BxF)

    def loss(self, params, batch: dict) -> jax.Array:
        return cross_entropy(self.logits_fn(self.graphdef, params, batch["x"]), batch["y"])

    def output(self, params, batch: dict):
        logits = self.logits_fn(self.graphdef, params, batch["x"])
        logp = jax.nn.log_softmax(logits)
        p = jnp.exp(jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0])
        return margin(logits, batch["y"]), 1.0 - p

    # --- the recipe ---------------------------------------------------------------------------

    def retrain(self, key, weight_N=None):
        """Params trained with the recipe (own init key; optional 0/1 row mask)."""
        if self.retrain_fn is None:
            raise ConfigError(
                "this classifier task has no retrain recipe: pass retrain=... to "
                "stride_jax.tasks.classifier (methods that retrain need one)"
            )
        b = self.arrays(self.train)
        return self.retrain_fn(key, b["x"], b["y"], as_weights(weight_N, len(self.train)))

    # --- STRIDE's site --------------------------------------------------------------------------

    def site(self, config):
        from stride_jax.stride import sites

        return sites.classifier_site(self, config)
