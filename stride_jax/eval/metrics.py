"""Attribution evaluation: linear datamodeling score (LDS) and score statistics.

Conventions: ``scores_QxN`` holds one row of attribution scores per query, and a HIGHER score
means the training example HELPS (lowers) that query's loss. Ground truth comes from M models
retrained on random subsets: ``masks_MxN`` (bool, which examples each model saw) and
``losses_MxQ`` (each retrained model's loss on each query).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("spearman", "pearson", "kendall")


def _float(x) -> jax.Array:
    """``x`` as the default JAX float (float32, or float64 under ``jax_enable_x64``)."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _check_2d(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if 0 in x.shape:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    return x


def _check_finite(name: str, x: jax.Array) -> None:
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or inf")


def _check_scores(scores_QxN) -> jax.Array:
    scores_QxN = _float(_check_2d("scores_QxN", scores_QxN))
    _check_finite("scores_QxN", scores_QxN)
    return scores_QxN


def _check_masks(masks_MxN) -> jax.Array:
    masks_MxN = _check_2d("masks_MxN", masks_MxN)
    if masks_MxN.dtype != jnp.bool_ and not bool(jnp.all((masks_MxN == 0) | (masks_MxN == 1))):
        raise ValueError("masks_MxN must be boolean (or contain only 0 and 1)")
    return _float(masks_MxN)


def _check_scores_masks(scores_QxN, masks_MxN) -> tuple[jax.Array, jax.Array]:
    scores_QxN, masks_MxN = _check_scores(scores_QxN), _check_masks(masks_MxN)
    if scores_QxN.shape[1] != masks_MxN.shape[1]:
        raise ValueError(
            f"scores_QxN has {scores_QxN.shape[1]} columns but masks_MxN has {masks_MxN.shape[1]}"
        )
    return scores_QxN, masks_MxN


@jax.jit
def _matmul_masks_scores(masks_MxN: jax.Array, scores_QxN: jax.Array) -> jax.Array:
    return jnp.matmul(masks_MxN, scores_QxN.T, precision=jax.lax.Precision.HIGHEST)


def predicted_responses(scores_QxN, masks_MxN) -> jax.Array:
    """``preds_MxQ``: for each model and query, the sum of the scores of the retained examples."""
    scores_QxN, masks_MxN = _check_scores_masks(scores_QxN, masks_MxN)
    return _matmul_masks_scores(masks_MxN, scores_QxN)


def _average_ranks(x_M: jax.Array) -> jax.Array:
    """1-based ranks with ties given their average rank (as ``scipy.stats.rankdata``).

    Exact for ties: the average rank of a value is (#smaller + #smaller-or-equal + 1) / 2,
    both counts read off the sorted vector with ``searchsorted``.
    """
    sorted_M = jnp.sort(x_M)
    lo = jnp.searchsorted(sorted_M, x_M, side="left")
    hi = jnp.searchsorted(sorted_M, x_M, side="right")
    return (lo + hi + 1).astype(x_M.dtype) / 2


def _pearson(x_M: jax.Array, y_M: jax.Array) -> jax.Array:
    xc, yc = x_M - x_M.mean(), y_M - y_M.mean()
    r = jnp.sum(xc * yc) / jnp.sqrt(jnp.sum(xc * xc) * jnp.sum(yc * yc))
    return jnp.clip(r, -1.0, 1.0)


def _spearman(x_M: jax.Array, y_M: jax.Array) -> jax.Array:
    return _pearson(_average_ranks(x_M), _average_ranks(y_M))


@partial(jax.jit, static_argnames="kind")
def _correlations_Q(preds_QxM: jax.Array, targets_QxM: jax.Array, kind: str) -> jax.Array:
    fn = _spearman if kind == "spearman" else _pearson
    return jax.vmap(fn)(preds_QxM, targets_QxM)


@partial(jax.jit, static_argnames="n_boot")
def _bootstrap_means(key: jax.Array, values_V: jax.Array, n_boot: int) -> jax.Array:
    idx_BxV = jax.random.randint(key, (n_boot, values_V.shape[0]), 0, values_V.shape[0])
    return values_V[idx_BxV].mean(axis=1)


def lds(scores_QxN, masks_MxN, losses_MxQ, *, kind="spearman", key=None, n_boot=1000) -> dict:
    """Linear datamodeling score: per query, the correlation across the M retrained models
    between the predicted response (sum of retained scores) and the NEGATED retrained loss.

    Queries whose prediction or target is constant over the models get ``nan`` and are left
    out of the mean. Returns ``{"lds", "ci95", "per_query", "num_valid"}``, where ``ci95`` is a
    95% percentile bootstrap interval of the mean, resampling valid queries with replacement
    (``n_boot`` resamples drawn with ``key``, default ``jax.random.key(0)``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    scores_QxN, masks_MxN = _check_scores_masks(scores_QxN, masks_MxN)
    losses_MxQ = _float(_check_2d("losses_MxQ", losses_MxQ))
    _check_finite("losses_MxQ", losses_MxQ)
    (q, _), m = scores_QxN.shape, masks_MxN.shape[0]
    if losses_MxQ.shape[0] != m:
        raise ValueError(f"masks_MxN has {m} rows but losses_MxQ has {losses_MxQ.shape[0]}")
    if losses_MxQ.shape[1] != q:
        raise ValueError(
            f"scores_QxN has {q} rows but losses_MxQ has {losses_MxQ.shape[1]} columns"
        )

    preds_QxM = _matmul_masks_scores(masks_MxN, scores_QxN).T
    targets_QxM = -losses_MxQ.T
    valid_Q = np.asarray(
        (preds_QxM.max(1) > preds_QxM.min(1)) & (targets_QxM.max(1) > targets_QxM.min(1))
    )
    if kind == "kendall":
        import scipy.stats  # only here: the import costs a binary's start-up 0.6 s

        p_QxM, t_QxM = np.asarray(preds_QxM, np.float64), np.asarray(targets_QxM, np.float64)
        per_query_Q = np.full(q, np.nan)
        for i in np.flatnonzero(valid_Q):
            per_query_Q[i] = scipy.stats.kendalltau(p_QxM[i], t_QxM[i]).statistic
    else:
        per_query_Q = np.asarray(_correlations_Q(preds_QxM, targets_QxM, kind), np.float64)
    per_query_Q = np.where(valid_Q, per_query_Q, np.nan)

    values_V = per_query_Q[valid_Q]
    if values_V.size == 0:
        nan = float("nan")
        return {"lds": nan, "ci95": [nan, nan], "per_query": per_query_Q, "num_valid": 0}
    key = jax.random.key(0) if key is None else key
    means_B = np.asarray(_bootstrap_means(key, jnp.asarray(values_V), int(n_boot)), np.float64)
    lo, hi = np.percentile(means_B, [2.5, 97.5])
    return {
        "lds": float(values_V.mean()),
        "ci95": [float(lo), float(hi)],
        "per_query": per_query_Q,
        "num_valid": int(values_V.size),
    }


def paired_difference(per_query_a, per_query_b, *, key=None, n_boot=1000) -> dict:
    """Mean of (a - b) over queries valid in both, with a paired bootstrap 95% CI.

    Both methods are scored on the same queries, so resampling the queries jointly removes the
    between-query variance that makes two unpaired CIs overlap.
    """
    a, b = np.asarray(per_query_a, np.float64), np.asarray(per_query_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"per-query arrays must be 1-D of one shape, got {a.shape}, {b.shape}")
    diff_V = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if diff_V.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")]}
    key = jax.random.key(0) if key is None else key
    means_B = np.asarray(_bootstrap_means(key, jnp.asarray(diff_V), int(n_boot)), np.float64)
    lo, hi = np.percentile(means_B, [2.5, 97.5])
    return {"mean": float(diff_V.mean()), "ci95": [float(lo), float(hi)]}


@partial(jax.jit, static_argnames="k")
def _row_stats(scores_QxN: jax.Array, k: int) -> tuple[jax.Array, ...]:
    n = scores_QxN.shape[1]
    nnz_Q = jnp.sum(scores_QxN != 0, axis=1)
    abs_sorted_QxN = jnp.sort(jnp.abs(scores_QxN), axis=1)  # ascending
    total_Q = abs_sorted_QxN.sum(axis=1)
    safe_total_Q = jnp.where(total_Q > 0, total_Q, 1.0)
    weights_N = 2.0 * jnp.arange(1, n + 1, dtype=scores_QxN.dtype) - n - 1
    gini_Q = jnp.where(total_Q > 0, abs_sorted_QxN @ weights_N / (n * safe_total_Q), 0.0)
    top_Q = abs_sorted_QxN[:, n - k :].sum(axis=1)
    coverage_Q = jnp.where(total_Q > 0, top_Q / safe_total_Q, jnp.nan)
    return nnz_Q, gini_Q, coverage_Q


def score_stats(scores_QxN) -> dict:
    """Concentration statistics of attribution scores, as plain floats.

    ``sparsity``: mean fraction of exact zeros per query; ``nnz_p50``/``nnz_p90``: quantiles of
    the nonzero count per query; ``gini``: mean Gini coefficient of ``|scores|`` (0 = equal,
    towards 1 = concentrated; an all-zero row counts as 0); ``top10_coverage``: mean share of
    ``sum |scores|`` held by the ``ceil(N / 10)`` largest entries (all-zero rows left out).
    """
    scores_QxN = _check_scores(scores_QxN)
    n = scores_QxN.shape[1]
    nnz_Q, gini_Q, coverage_Q = (
        np.asarray(a, np.float64) for a in _row_stats(scores_QxN, -(-n // 10))
    )
    coverage_Q = coverage_Q[~np.isnan(coverage_Q)]
    return {
        "sparsity": float(np.mean(1.0 - nnz_Q / n)),
        "nnz_p50": float(np.percentile(nnz_Q, 50)),
        "nnz_p90": float(np.percentile(nnz_Q, 90)),
        "gini": float(gini_Q.mean()),
        "top10_coverage": float(coverage_Q.mean()) if coverage_Q.size else float("nan"),
    }
