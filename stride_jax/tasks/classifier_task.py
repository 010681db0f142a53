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

from stride_jax import distributed
from stride_jax.data import Dataset
from stride_jax.errors import ConfigError
from stride_jax.func import programs
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

    def perturbed(self, rows: Dataset, key, amount: float) -> Dataset:
        """``rows`` plus Gaussian noise of ``amount`` training-feature standard deviations."""
        std_F = np.asarray(self.train.x_NxF, np.float64).std(axis=0)
        noise = np.asarray(jax.random.normal(key, np.shape(rows.x_NxF)), np.float64)
        x = np.asarray(rows.x_NxF, np.float64) + amount * std_F * noise
        return Dataset(x.astype(np.asarray(rows.x_NxF).dtype), rows.y_N, rows.ids_N)

    # --- the model --------------------------------------------------------------------------

    def logits(self, x_BxF, params=None) -> jax.Array:
        return self.logits_fn(self.graphdef, self.params if params is None else params, x_BxF)

    def features(self, x_BxF, params=None) -> jax.Array:
        return self.features_fn(self.graphdef, self.params if params is None else params, x_BxF)

    def row_metrics(self, rows: Dataset, params=None) -> dict[str, np.ndarray]:
        out = super().row_metrics(rows, params)
        b = self.arrays(rows)
        pred = np.asarray(jnp.argmax(self.logits(b["x"], params), axis=-1))
        out["correct"] = (pred == np.asarray(rows.y_N)).astype(np.float32)
        return out

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

    # --- the base model's trajectory (TracIn) ----------------------------------------------

    def trajectory(self, num_checkpoints: int):
        """(params after each of C evenly spaced segments of the recipe, lr_C): the MLP recipe
        replayed from ``key(model_config.seed)`` with all-ones weights (how the benchmark
        trains the base model); lr_c is the mean scheduled learning rate over segment c
        (``mlp.fit_trajectory``). The last checkpoint is the replayed final model."""
        if self.model_config is None:
            raise ConfigError(
                "TracIn needs the base model's trajectory, which this classifier task cannot "
                "replay: only the library's MLP (tasks.mlp_task, with model_config) can"
            )
        from stride_jax.models import mlp

        c, b, n = self.model_config, self.arrays(self.train), len(self.train)

        def build():  # the rows are arguments; kept per task, recipe and C
            return lambda k, x, y, w: mlp.fit_trajectory(
                c, k, x, y, w, self.num_classes, num_checkpoints
            )

        key = ("trajectory", repr(c), int(num_checkpoints))
        fn = programs.per_task(self, key, build)
        _, stacked, lr_C = fn(jax.random.key(c.seed), b["x"], b["y"], jnp.ones(n))
        ckpts = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_checkpoints)]
        return ckpts, lr_C

    # --- many retrains at once ------------------------------------------------------------------

    def retrain_losses(
        self, keys_M, weights_MxN, rows, group: int = 1, label: str = "retrains"
    ) -> np.ndarray:
        """losses_MxB on ``rows`` of M retrains. The MLP (``model_config`` set) trains
        ``group`` models per vmapped step (0: chosen from the memory available) with the
        models sharded over the mesh (``groundtruth.retrain_many``, as the ground truth
        does); other models loop. Progress is logged as ``label``."""
        if self.model_config is None:
            return super().retrain_losses(keys_M, weights_MxN, rows, group, label)
        from stride_jax import sharding
        from stride_jax.eval import groundtruth

        mesh = self.mesh if self.mesh is not None else sharding.make_mesh()
        b, q = self.arrays(self.train), self.arrays(rows)
        m = np.asarray(weights_MxN).shape[0]
        group = groundtruth.group_size(
            self.model_config, b["x"].shape, self.num_classes, m, group, mesh, label
        )
        params_M = groundtruth.retrain_many(
            self.model_config,
            keys_M,
            b["x"],
            b["y"],
            weights_MxN,
            self.num_classes,
            mesh,
            group,
            label,
        )
        losses_MxB = groundtruth.query_losses(
            self.model_config, params_M, q["x"], q["y"], self.num_classes, group
        )
        return np.asarray(distributed.to_host(losses_MxB), np.float32)

    # --- dense layers (K-FAC / EK-FAC) ---------------------------------------------------------

    def dense_layers(self, select=None) -> tuple[str, ...]:
        """The module's ``nnx.Linear`` layers (kernel and bias) among the chosen parameters."""
        from stride_jax.tasks import dense

        self._check_plain_forward()
        names = self.param_names(select)
        return dense.linear_layers(self.graphdef, self.params, names, self.train.x_NxF.shape[1])

    def dense_io(
        self, params, batch: dict, layers, fisher: str = "empirical", key=None, with_data=False
    ):
        from stride_jax.tasks import dense

        self._check_plain_forward()
        return dense.dense_io(self.graphdef, params, batch, layers, fisher, key, with_data)

    def _check_plain_forward(self) -> None:
        from stride_jax.models import mlp

        if self.logits_fn not in (default_logits, mlp.apply):
            raise ConfigError(
                "kfac/ekfac tap the module's nnx.Linear layers in its own forward pass "
                "(module(x)); this task's custom logits_fn hides it"
            )
