"""LDS for one's own task: retrain on random subsets with the task's recipe, then correlate.

    res = stride_jax.evaluate.lds(task, scores_QxE, num_models=50, alpha=0.5)
    res["lds"], res["ci95"]

The ground truth is ``num_models`` models retrained with ``task.retrain`` (its own recipe) on
random alpha-fractions of the training EXAMPLES (all rows of a chunked example together); the
LDS is the Spearman correlation, across those models, between the summed scores of the kept
examples and the negated query loss, averaged over queries (``metrics.lds``).

Retrained elsewhere (your own training loop, a cluster job)? ``lds_from_retrains(scores_QxN,
masks_MxN, losses_MxQ)`` computes the same LDS from the subsets and the query losses.
"""

from __future__ import annotations

import time

import numpy as np
from absl import logging

from stride_jax import logs
from stride_jax.eval import groundtruth, metrics
from stride_jax.task import Task


def ground_truth(
    task: Task,
    num_models: int = 50,
    alpha: float = 0.5,
    seed: int = 0,
    queries=None,
    *,
    verbose=None,
):
    """``{"masks_MxE", "losses_MxQ"}``: example masks and the retrained models' query losses
    (``verbose``: progress lines, as in ``lds``)."""
    with logs.verbosity(verbose):
        masks, keys = groundtruth.masks_and_keys(seed, num_models, task.num_examples, alpha)
        weights = task.example_weights(np.asarray(masks, np.float32))
        rows = task.query if queries is None else queries
        logging.info(
            "lds: retraining %d models with the task's recipe on %.0f%% subsets of %d examples",
            num_models,
            100 * alpha,
            task.num_examples,
        )
        t0 = time.time()
        losses = np.asarray(task.retrain_losses(keys, weights, rows), np.float32)
        seconds = time.time() - t0
        logging.info(
            "lds: %d retrains done in %.1fs (%.2fs per model)",
            num_models,
            seconds,
            seconds / num_models,
        )
    return {"masks_MxE": np.asarray(masks), "losses_MxQ": losses}


def lds(
    task: Task,
    scores_QxE,
    *,
    num_models: int = 50,
    alpha: float = 0.5,
    seed: int = 0,
    queries=None,
    ground_truth_data: dict | None = None,
    n_boot: int = 1000,
    verbose=None,
) -> dict:
    """LDS of ``scores_QxE`` (from ``stride_jax.attribute``) against fresh retrains, with a
    bootstrap 95% CI over queries: ``{"lds", "ci95", "per_query", "num_valid", "ground_truth"}``.
    Pass ``ground_truth_data`` (an earlier result's ``"ground_truth"``) to score several
    methods against the same retrains. ``verbose``: progress lines of the retrains (True,
    False, a level name, or None: follow ``stride_jax.set_verbosity``, on before any call)."""
    gt = ground_truth_data or ground_truth(task, num_models, alpha, seed, queries, verbose=verbose)
    res = metrics.lds(scores_QxE, gt["masks_MxE"], gt["losses_MxQ"], n_boot=n_boot)
    return {**res, "ground_truth": gt}


def _check_retrains(scores_QxN, masks_MxN, losses_MxQ):
    """The three arrays as numpy, or one ``ValueError`` naming the first problem."""
    arrays = {"scores_QxN": scores_QxN, "masks_MxN": masks_MxN, "losses_MxQ": losses_MxQ}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for name, a in arrays.items():
        if a.ndim != 2 or 0 in a.shape:
            raise ValueError(f"{name} must be a non-empty 2-D array, got shape {a.shape}")
    (q, n), (m, n_masks), (m_losses, q_losses) = (a.shape for a in arrays.values())
    shapes = ", ".join(f"{k} {a.shape}" for k, a in arrays.items())
    for what, sizes in (
        ("N (training examples): scores_QxN columns vs masks_MxN columns", (n, n_masks)),
        ("M (retrained models): masks_MxN rows vs losses_MxQ rows", (m, m_losses)),
        ("Q (queries): scores_QxN rows vs losses_MxQ columns", (q, q_losses)),
    ):
        if sizes[0] != sizes[1]:
            raise ValueError(f"shapes do not fit ({shapes}): {what} are {sizes[0]} vs {sizes[1]}")
    for name in ("scores_QxN", "losses_MxQ"):
        a = arrays[name]
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
        bad = ~np.isfinite(a)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(
                f"{name} has {int(bad.sum())} NaN or inf entries (first at [{r}, {c}])"
            )
    masks = arrays["masks_MxN"]
    if masks.dtype != bool and not np.isin(masks, (0, 1)).all():
        raise ValueError("masks_MxN must be boolean (True = the model trained on the example)")
    return arrays.values()


def lds_from_retrains(
    scores_QxN, masks_MxN, losses_MxQ, n_boot: int = 1000, kind: str = "spearman"
) -> dict:
    """LDS of attribution scores against models YOU retrained on example subsets.

    ``scores_QxN``: one row per query, one column per training example, higher = helps
    (``stride_jax.attribute``'s output); ``masks_MxN``: bool, ``masks_MxN[m, i]`` = model m
    trained on example i (random subsets, e.g. half of the examples each); ``losses_MxQ``:
    model m's loss on query q. Per query, the correlation (``kind``: "spearman", "pearson" or
    "kendall") over the M models between ``masks_MxN @ scores`` and the negated loss,
    averaged over the queries where both vary; returns ``{"lds", "ci95" (bootstrap over
    queries, ``n_boot`` resamples), "per_query", "num_valid"}`` (``eval.metrics.lds``).
    Arrays that do not fit raise one ``ValueError`` naming the mismatch."""
    scores_QxN, masks_MxN, losses_MxQ = _check_retrains(scores_QxN, masks_MxN, losses_MxQ)
    return metrics.lds(scores_QxN, masks_MxN, losses_MxQ, kind=kind, n_boot=n_boot)
