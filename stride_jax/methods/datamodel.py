"""Datamodels: the costly reference. Retrain many models, regress each query's loss on masks.

``"datamodel"`` (every task kind) retrains ``cfg.num_models`` extra models, each on its own
random ``cfg.alpha``-subset of the training EXAMPLES (a decoder example's rows are kept or
dropped together, as the ground truth does), with the task's own recipe
(``task.retrain_losses``: ``cfg.models_per_batch`` models per vmapped call). The masks and
init keys come from ``cfg.seed``, which MUST differ from the ground truth's seed: otherwise
the datamodel is fitted on the very retrains LDS evaluates it on. Per query row, a ridge
regression (with intercept, penalty ``cfg.ridge``) of the negated retrained loss on the 0/1
example mask gives one coefficient per training example: the score (positive = keeping the
example lowers the loss, i.e. it helps). A decoder example's coefficient is shared equally by
its rows, so ``task.sum_to_examples`` gives it back.

Config (``default_config(kind)``):

- ``num_models``: extra retrains (classifier 2000: the budget at which the reference is still
  affordable on the benchmark's data; decoder 256, each retrain costing far more).
- ``alpha=0.5``: fraction of the training examples each retrain keeps (as the ground truth).
- ``seed=11``: masks and init keys; must differ from the ground truth's seed (default 1).
- ``ridge=300.0``: L2 penalty on the coefficients, ``sklearn.linear_model.Ridge(alpha=ridge)``
  (must be > 0). Tuned on the 197 validation digits (N=1400, 100 ground-truth models,
  M=2000 retrains): LDS 0.545 / 0.577 / 0.584 / 0.569 / 0.549 at ridge 30 / 100 / 300 /
  1000 / 3000; on the reported queries ridge 300 gives 0.565 [0.551, 0.579].
- ``models_per_batch``: models trained (and evaluated) per vmapped group (classifier 50,
  decoder 8; 0: as many as fit in the memory available, ``resources.models_at_once``).

``fit`` does the retrains and keeps their losses on ``task.query`` (the query rows the job
scores); ``score`` on those rows solves all their ridge problems at once, on other rows it
retrains again (same masks and keys) to evaluate them. Retrains are cached in memory by
content (the task's rows and recipe, and num_models / alpha / seed but not the ridge), so a
ridge sweep reuses them.

``ceiling_losses`` and ``retrain_agreement`` give the benchmark's noise
ceiling: the ground truth's subsets retrained with other init keys, and the per-query
Spearman correlation, across models, between the two sets of retrained losses. It measures
the ground truth's seed noise; it is not a bound: both sets carry seed noise, while a method's
prediction carries none and meets it only in the ground truth, so a method can exceed it.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from stride_jax import methods
from stride_jax.eval import groundtruth, metrics

_HI = jax.lax.Precision.HIGHEST
_DEFAULTS = {
    "classifier": dict(num_models=2000, alpha=0.5, seed=11, ridge=300.0, models_per_batch=50),
    "decoder": dict(num_models=256, alpha=0.5, seed=11, ridge=300.0, models_per_batch=8),
}


def default_config(kind: str = "classifier") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(_DEFAULTS[kind])


# --- the ridge ---------------------------------------------------------------------------


@jax.jit
def _ridge(masks_MxN: jax.Array, targets_MxQ: jax.Array, ridge: jax.Array) -> jax.Array:
    """Ridge coefficients (with intercept) of every target column on the masks, N x Q.

    Intercept = centre the masks and the targets. Then one solve for all Q queries:
    primal ``(Xc'Xc + lam I_N)^-1 Xc'Yc`` when N <= M, dual ``Xc'(XcXc' + lam I_M)^-1 Yc``
    when M < N (the same coefficients; the smaller Gram matrix).
    """
    m, n = masks_MxN.shape
    xc = masks_MxN - masks_MxN.mean(axis=0, keepdims=True)
    yc = targets_MxQ - targets_MxQ.mean(axis=0, keepdims=True)
    if n <= m:
        gram = jnp.matmul(xc.T, xc, precision=_HI) + ridge * jnp.eye(n, dtype=xc.dtype)
        rhs = jnp.matmul(xc.T, yc, precision=_HI)
        return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), rhs)
    gram = jnp.matmul(xc, xc.T, precision=_HI) + ridge * jnp.eye(m, dtype=xc.dtype)
    dual = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), yc)
    return jnp.matmul(xc.T, dual, precision=_HI)


def ridge_coefficients(masks_MxN, targets_MxQ, ridge: float) -> jax.Array:
    """coef_NxQ of ``Ridge(alpha=ridge, fit_intercept=True)`` fitted per target column."""
    if not ridge > 0:
        raise ValueError(
            f"datamodel ridge must be > 0 (centred masks are rank-deficient), got {ridge}"
        )
    masks = jnp.asarray(masks_MxN, jnp.float32)
    targets = jnp.asarray(targets_MxQ, jnp.float32)
    if masks.ndim != 2 or targets.ndim != 2 or masks.shape[0] != targets.shape[0]:
        raise ValueError(
            f"need masks M x N and targets M x Q, got {masks.shape} and {targets.shape}"
        )
    return _ridge(masks, targets, jnp.float32(ridge))


# --- examples and rows ----------------------------------------------------------------------


def example_shares(task) -> np.ndarray | None:
    """share_ExN: example e's coefficient goes in equal parts to its training rows (rows of a
    decoder's long example); None when rows are examples."""
    if task.num_examples == len(task.train):
        return None
    member_ExN = np.asarray(task.example_weights(np.eye(task.num_examples)), np.float32)
    return member_ExN / np.maximum(member_ExN.sum(1, keepdims=True), 1.0)


# --- fit and score ---------------------------------------------------------------------------

# Retrains depend on the task's rows and recipe and on (num_models, alpha, seed) only, not on
# the ridge: a tuning sweep over ``ridge`` in one process (which rebuilds its task per point)
# reuses them. Keyed by content; at most one set is kept.
_FITS: dict = {}


def _digest(task, cfg) -> str:
    """A content digest of what the retrains depend on."""
    h = hashlib.sha1(repr((task.kind, int(cfg.num_models), float(cfg.alpha))).encode())
    h.update(repr(int(cfg.seed)).encode())
    for rows in (task.train, task.query):
        if rows is not None:
            for leaf in jax.tree.leaves(task.arrays(rows)):
                h.update(np.asarray(leaf).tobytes())
    for name in ("model_config", "recipe", "num_classes", "retrain_fn"):
        part = getattr(task, name, None)
        if hasattr(part, "to_json"):
            part = part.to_json()
        elif callable(part):
            part = id(part)
        h.update(repr(part).encode())
    for leaf in jax.tree.leaves(getattr(task, "params0", None)):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def _losses(task, state, rows, cfg) -> np.ndarray:
    weights_MxN = task.example_weights(state["masks_MxE"])
    return np.asarray(
        task.retrain_losses(
            state["keys_M"], weights_MxN, rows, int(cfg.models_per_batch), label="datamodel"
        ),
        np.float32,
    )


def fit(task, cfg=None):
    """Masks and keys of ``cfg.num_models`` retrains, and their losses on ``task.query``."""
    cfg = default_config(task.kind) if cfg is None else cfg
    key = _digest(task, cfg)
    if key in _FITS:
        return _FITS[key]
    masks, keys = groundtruth.masks_and_keys(
        int(cfg.seed), int(cfg.num_models), task.num_examples, float(cfg.alpha)
    )
    state = {"masks_MxE": masks, "keys_M": keys, "share_ExN": example_shares(task)}
    if task.query is not None:
        logging.info(
            "datamodel: retraining %d models on %.0f%% subsets (seed %d)",
            cfg.num_models,
            100 * cfg.alpha,
            cfg.seed,
        )
        state["query_rows"] = task.query
        state["losses_MxQ"] = _losses(task, state, task.query, cfg)
    _FITS.clear()  # keep at most one set of retrains in memory
    _FITS[key] = state
    return state


def _same_rows(task, a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None or len(a) != len(b):
        return False
    leaves_a, leaves_b = (jax.tree.leaves(task.arrays(r)) for r in (a, b))
    return all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


def score(task, state, query, cfg=None):
    """Per query row, ridge of -loss on the example masks over the retrains; scores_QxN."""
    cfg = default_config(task.kind) if cfg is None else cfg
    if _same_rows(task, query, state.get("query_rows")):
        losses_MxQ = state["losses_MxQ"]
    else:
        logging.info("datamodel: retraining %d models for other query rows", cfg.num_models)
        losses_MxQ = _losses(task, state, query, cfg)
    coef_ExQ = ridge_coefficients(state["masks_MxE"], -losses_MxQ, float(cfg.ridge))
    if state["share_ExN"] is None:
        return methods.as_scores(coef_ExQ.T)
    return methods.as_scores(np.asarray(coef_ExQ).T @ state["share_ExN"])


methods.register("datamodel", fit, score, default_config=default_config)


# --- noise ceiling -------------------------------------------------------------------------


def ceiling_losses(task, masks_MxE, key, rows, group: int) -> np.ndarray:
    """losses_MxQ on ``rows`` of the SAME example subsets ``masks_MxE`` (the ground truth's)
    retrained with init keys drawn from ``key`` (unrelated to the ground truth's seed),
    ``group`` models at a time (0: as many as fit in memory, ``resources.models_at_once``)."""
    keys_M = jax.random.split(key, np.asarray(masks_MxE).shape[0])
    weights_MxN = task.example_weights(masks_MxE)
    losses = task.retrain_losses(keys_M, weights_MxN, rows, int(group), label="noise ceiling")
    return np.asarray(losses, np.float32)


def retrain_agreement(losses_a_MxQ, losses_b_MxQ, *, kind="spearman", key=None, n_boot=1000):
    """Per query, the correlation across models between ``-losses_a`` and ``-losses_b``.

    Same return value and conventions as ``metrics.lds`` (``{"lds", "ci95", "per_query",
    "num_valid"}``, constant queries left out, bootstrap CI over queries), because it IS
    ``metrics.lds`` with model m's "prediction" = ``-losses_a[m]``: identity masks over M
    pseudo-examples and scores ``-losses_a.T`` give ``preds_MxQ = -losses_a`` exactly.
    """
    a = np.asarray(losses_a_MxQ, np.float32)
    b = np.asarray(losses_b_MxQ, np.float32)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"losses must be two M x Q arrays of one shape, got {a.shape}, {b.shape}")
    eye_MxM = np.eye(a.shape[0], dtype=bool)
    return metrics.lds(-a.T, eye_MxM, b, kind=kind, key=key, n_boot=n_boot)
