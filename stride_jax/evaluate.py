"""LDS for one's own task: retrain on random subsets with the task's recipe, then correlate.

    res = stride_jax.evaluate.lds(task, scores_QxE, num_models=50, alpha=0.5)
    res["lds"], res["ci95"]

The ground truth is ``num_models`` models retrained with ``task.retrain`` (its own recipe) on
random alpha-fractions of the training EXAMPLES (all rows of a chunked example together); the
LDS is the Spearman correlation, across those models, between the summed scores of the kept
examples and the negated query loss, averaged over queries (``metrics.lds``).
"""

from __future__ import annotations

import numpy as np

from stride_jax.eval import groundtruth, metrics
from stride_jax.task import Task


def ground_truth(task: Task, num_models: int = 50, alpha: float = 0.5, seed: int = 0, queries=None):
    """``{"masks_MxE", "losses_MxQ"}``: example masks and the retrained models' query losses."""
    masks, keys = groundtruth.masks_and_keys(seed, num_models, task.num_examples, alpha)
    weights = task.example_weights(np.asarray(masks, np.float32))
    rows = task.query if queries is None else queries
    losses = task.retrain_losses(keys, weights, rows)
    return {"masks_MxE": np.asarray(masks), "losses_MxQ": np.asarray(losses, np.float32)}


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
) -> dict:
    """LDS of ``scores_QxE`` (from ``stride_jax.attribute``) against fresh retrains, with a
    bootstrap 95% CI over queries: ``{"lds", "ci95", "per_query", "num_valid", "ground_truth"}``.
    Pass ``ground_truth_data`` (an earlier result's ``"ground_truth"``) to score several
    methods against the same retrains."""
    gt = ground_truth_data or ground_truth(task, num_models, alpha, seed, queries)
    res = metrics.lds(scores_QxE, gt["masks_MxE"], gt["losses_MxQ"], n_boot=n_boot)
    return {**res, "ground_truth": gt}
