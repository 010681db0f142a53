"""The task protocol: everything an attribution method may know about a model and its data.

Every method (STRIDE and each baseline), the ground truth and the job talk to a model only
through a ``Task``. Two implementations live in ``stride_jax.tasks``: ``ClassifierTask`` (the
MLP, or any Flax NNX module with a logits function) and ``DecoderTask`` (the NNX transformer,
from scratch or from HF / GGUF weights). Nothing outside ``tasks/`` needs to know which one it
has; a method that works for one kind only declares so when it registers
(``stride_jax.methods.register(..., kinds=...)``).

Rows and examples. A task's data are *rows*: a classifier row is one example ``(x, y)``; a
decoder row is one fixed-length block of tokens, a whole example or one chunk of a long one.
``task.train`` and ``task.query`` are the row sets (``data.Dataset`` / ``data.TokenBlocks``);
methods score rows, and ``task.sum_to_examples`` adds row scores up to examples.
``task.arrays(rows)`` turns a row set into the dict of device arrays (leading axis = rows) that
the pure functions below take:

- classifier: ``{"x": B x F float32, "y": B int32}``
- decoder: ``{"tokens": B x L int32, "attn": B x L int32, "loss_mask": B x L float32}``

Pure functions (jittable; ``params`` is any pytree of the model's parameters):

- ``loss(params, batch) -> B``: each row's loss (a decoder row: mean CE over its target
  tokens, i.e. response tokens only for SFT rows);
- ``output(params, batch) -> (f_B, w_B)``: TRAK's model-output function and its reweighting
  (the classifier's margin ``log p/(1-p)`` with ``1 - p``; the decoder's negative loss with 1).

Parameter subsets (``param_names(select)``): per-row gradients (``stride_jax.func.grads``) are
taken over a chosen subset of the parameters: ``select.params_filter`` (a regex searched in
paths such as ``"layers/1/mlp/fc/kernel"``) or the task's default (the classifier: all; the
decoder: the MLPs of the last ``select.layers`` blocks).

The steering site (``site(config)``): where STRIDE's operators attach, with ``encode`` (rows to
the cached hidden state there) and the continuation from a steered state to outputs, losses
and top-K logits. See ``stride_jax.stride.sites``.

Dense layers (``dense_layers(select)``, ``dense_io(params, batch, layers, fisher, key)``):
the per-token inputs and output gradients of the chosen dense layers, from which K-FAC and
EK-FAC build their Kronecker factors (``stride_jax.func.curvature``).

The recipe: ``retrain(key, row_weights_N)`` trains a model with the task's own recipe on
weighted rows (0/1 masks in practice) and returns its params; ``retrain_losses(keys_M,
weights_MxN, batch)`` does that for M models and returns their losses on the rows ``batch``.

Display: ``render(rows, i)`` returns what a person reads for row i (an image tile or text).
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.func import programs

KINDS = ("classifier", "decoder")


class TaskError(ValueError):
    """A task built from mismatched parts (model, params, data): the message names the part."""


def path_str(path) -> str:
    """A parameter's path as ``"layers/1/mlp/fc/kernel"`` (attribute keys dropped)."""
    keys = [k for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def all_param_names(params) -> tuple[str, ...]:
    return tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


@dataclasses.dataclass
class Task(abc.ABC):
    """The frozen base model (``graphdef`` + ``params``) and its rows; see the module doc.

    ``mesh`` lays out devices (``stride_jax.sharding``); ``workdir`` (optional) is where a
    method may cache or checkpoint its own work; ``seed`` is the base recipe's seed.
    """

    kind: ClassVar[str]

    graphdef: object
    params: object
    train: object
    query: object = None
    mesh: object = None
    workdir: str | None = None
    seed: int = 0

    # --- rows ----------------------------------------------------------------------------

    @abc.abstractmethod
    def arrays(self, rows) -> dict:
        """Device arrays of a row set (leading axis = rows); see the module doc."""

    @property
    def num_examples(self) -> int:
        """Training examples (a decoder's long examples span several rows)."""
        return len(self.train)

    def sum_to_examples(self, scores_QxN) -> np.ndarray:
        """Row scores (Q x rows) summed over each training example's rows: Q x examples."""
        return np.asarray(scores_QxN)

    def example_weights(self, masks_MxE) -> np.ndarray:
        """Row weights M x rows from example masks M x examples (each row takes its example's)."""
        return np.asarray(masks_MxE)

    def with_train(self, train) -> Task:
        """This task with other training rows (same model and recipe; ``retrain`` fits them)."""
        return dataclasses.replace(self, train=train)

    def perturbed(self, rows, key, amount: float):
        """A lightly changed copy of ``rows`` (applications: near-duplicates); ``amount`` is
        the kind's strength (classifier: noise in feature standard deviations; decoder: the
        fraction of target tokens replaced)."""
        raise NotImplementedError(f"{type(self).__name__} cannot perturb rows")

    def render(self, rows, i: int):
        """What a person reads for row ``i`` of ``rows`` (an image tile or text)."""
        raise NotImplementedError(f"{type(self).__name__} cannot render rows")

    # --- the model as pure functions ---------------------------------------------------------

    @abc.abstractmethod
    def loss(self, params, batch: dict) -> jax.Array:
        """Per-row loss (B,) of the model with ``params`` on ``batch``; pure, jittable."""

    @abc.abstractmethod
    def output(self, params, batch: dict) -> tuple[jax.Array, jax.Array]:
        """TRAK's output function f_B and reweighting w_B; pure, jittable."""

    def row_metrics(self, rows, params=None) -> dict[str, np.ndarray]:
        """Per-row ``{"loss": B}`` of ``rows`` under ``params`` (default: base); a classifier
        adds ``"correct"`` (1.0 where the arg-max class is the label)."""
        return {"loss": np.asarray(self.row_losses(rows, params), np.float32)}

    def row_losses(self, rows, params=None, batch: int = 64) -> jax.Array:
        """Per-row loss of every row of ``rows`` under ``params`` (default: base), in batches."""

        def build():
            return lambda p, d: _map_rows(lambda r: self.loss(p, r), d, batch)

        fn = programs.per_task(self, ("row_losses", int(batch)), build)
        return fn(self.params if params is None else params, self.arrays(rows))

    # --- parameter subsets ---------------------------------------------------------------------

    def default_param_pattern(self, select) -> str | None:
        """The regex of the default parameter subset (None: every parameter)."""
        del select
        return None

    def param_names(self, select=None) -> tuple[str, ...] | None:
        """Paths of the parameters that per-row gradients are taken over, in tree order; None
        means all of them (flattened in the pytree's own order). ``select`` is a method config
        with optional ``params_filter`` (regex) and ``layers`` keys."""
        pattern = (select or {}).get("params_filter", "") or self.default_param_pattern(select)
        if pattern is None:
            return None
        names = all_param_names(self.params)
        chosen = tuple(s for s in names if re.search(pattern, s))
        if not chosen:
            raise TaskError(
                f"params_filter {pattern!r} matches no parameter path, e.g. {names[:3]}"
            )
        return chosen

    # --- the recipe ----------------------------------------------------------------------------

    @abc.abstractmethod
    def retrain(self, key, weight_N=None):
        """Params of a model trained with the task's recipe (optional row weights, N)."""

    def retrain_losses(
        self, keys_M, weights_MxN, rows, group: int = 1, label: str = "retrains"
    ) -> np.ndarray:
        """losses_MxB: per-row losses on ``rows`` of M models retrained on ``weights_MxN``
        (a plain loop here; implementations vmap ``group`` models at a time, 0 meaning
        as many as fit in memory); progress is logged as ``label``."""
        from stride_jax.resources import Progress

        del group
        batch = self.arrays(rows)
        progress, out = Progress(label, len(weights_MxN)), []
        for k, w in zip(keys_M, weights_MxN, strict=True):
            out.append(np.asarray(self.loss(self.retrain(k, w), batch)))
            progress.update(len(out))
        return np.stack(out).astype(np.float32)

    # --- STRIDE's attachment site ------------------------------------------------------------

    def site(self, config):
        """Where STRIDE's steering operators attach for the ``stride`` config ``config``."""
        raise NotImplementedError(f"{type(self).__name__} has no steering site")

    # --- dense layers: what K-FAC / EK-FAC need ----------------------------------------------

    def dense_layers(self, select=None) -> tuple[str, ...]:
        """Module paths (e.g. ``"layers/1/mlp/fc"``) of the dense layers that K-FAC covers
        among the parameters ``param_names(select)`` chooses, input to output."""
        raise NotImplementedError(f"{type(self).__name__} exposes no dense layers")

    def dense_io(
        self, params, batch: dict, layers, fisher: str = "empirical", key=None, with_data=False
    ):
        """Per-token inputs and output gradients of the dense ``layers`` on the rows ``batch``
        (pure, jittable): ``(a_L, mask_BxT, terms)`` with, per layer l (I_l in, O_l out),

        - ``a_L[l]``: B x T x I_l, the layer's inputs at the row's T tokens (a classifier row
          is one token; its inputs end in a constant 1 when the layer's bias is covered);
        - ``mask_BxT``: 1 at the real tokens (those the input factor E[a a^T] averages over);
        - ``terms``: [(weight_B, g_L)] with ``g_L[l]`` B x T x O_l the gradients of the row's
          loss w.r.t. the layer's outputs, for targets set by ``fisher``: "empirical" (the
          data's, one term of weight 1), "sampled" (drawn from the model's predictive
          distribution with ``key``, one term) or "true" (the exact expectation over it: one
          term per class weighted by its probability; classifiers only).

        With ``with_data`` a fourth element follows: ``g_L`` under the data's labels (the
        empirical term's), from the same forward pass where the task can share it (STRIDE's
        fused stage 1 needs both under the true Fisher).

        The row's gradient w.r.t. the layer's kernel is ``sum_t a_t g_t^T``."""
        raise NotImplementedError(f"{type(self).__name__} exposes no dense layers")


def _map_rows(fn, data: dict, batch: int):
    """``fn(one-row batch) -> (1, ...)`` over all rows with ``lax.map`` (``batch`` at a time)."""
    return jax.lax.map(lambda r: fn(jax.tree.map(lambda a: a[None], r))[0], data, batch_size=batch)


def as_weights(weight_N, n: int) -> jax.Array:
    """Row weights as float32 (all ones when None), checked against the row count."""
    if weight_N is None:
        return jnp.ones(n, jnp.float32)
    w = jnp.asarray(weight_N, jnp.float32)
    if w.shape != (n,):
        raise TaskError(f"row weights have shape {w.shape}, expected ({n},)")
    return w
