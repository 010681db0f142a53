"""Tests for stride_jax.metrics against independent scipy / numpy references."""

import jax
import numpy as np
import pytest
import scipy.stats

from stride_jax.eval import metrics
from stride_jax.eval.metrics import lds, predicted_responses, score_stats

M, Q, N = 30, 7, 40


def _problem(seed=0, m=M, q=Q, n=N):
    rng = np.random.default_rng(seed)
    scores_QxN = rng.normal(size=(q, n))
    masks_MxN = rng.random((m, n)) < 0.5
    losses_MxQ = rng.normal(size=(m, q))
    return scores_QxN, masks_MxN, losses_MxQ


def test_predicted_responses_is_sum_of_retained_scores():
    scores_QxN, masks_MxN, _ = _problem()
    preds_MxQ = np.asarray(predicted_responses(scores_QxN, masks_MxN))
    expected_MxQ = np.array([[s[mask].sum() for s in scores_QxN] for mask in masks_MxN])
    np.testing.assert_allclose(preds_MxQ, expected_MxQ, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kind, ref",
    [
        ("spearman", scipy.stats.spearmanr),
        ("pearson", scipy.stats.pearsonr),
        ("kendall", scipy.stats.kendalltau),
    ],
)
def test_per_query_matches_scipy(kind, ref):
    scores_QxN, masks_MxN, losses_MxQ = _problem(seed=1)
    preds_MxQ = masks_MxN.astype(np.float64) @ scores_QxN.T
    expected_Q = np.array([ref(preds_MxQ[:, q], -losses_MxQ[:, q]).statistic for q in range(Q)])
    out = lds(scores_QxN, masks_MxN, losses_MxQ, kind=kind, n_boot=10)
    np.testing.assert_allclose(out["per_query"], expected_Q, atol=1e-5)
    assert out["num_valid"] == Q
    assert out["lds"] == pytest.approx(expected_Q.mean(), abs=1e-5)


def test_spearman_handles_ties_like_scipy():
    scores_QxN, masks_MxN, losses_MxQ = _problem(seed=2)
    losses_MxQ = np.round(losses_MxQ)  # many tied targets
    preds_MxQ = masks_MxN.astype(np.float64) @ scores_QxN.T
    expected_Q = [scipy.stats.spearmanr(preds_MxQ[:, q], -losses_MxQ[:, q])[0] for q in range(Q)]
    out = lds(scores_QxN, masks_MxN, losses_MxQ, kind="spearman", n_boot=10)
    np.testing.assert_allclose(out["per_query"], expected_Q, atol=1e-5)


@pytest.mark.parametrize("kind", ["spearman", "pearson", "kendall"])
def test_sign_convention(kind):
    rng = np.random.default_rng(3)
    true_QxN = rng.normal(size=(Q, N))
    masks_MxN = rng.random((M, N)) < 0.5
    # Retaining an example with a positive true score lowers the loss.
    losses_MxQ = -(masks_MxN @ true_QxN.T) + 1e-6 * rng.normal(size=(M, Q))
    assert lds(true_QxN, masks_MxN, losses_MxQ, kind=kind)["lds"] > 0.99
    assert lds(-true_QxN, masks_MxN, losses_MxQ, kind=kind)["lds"] < -0.99


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    scores_QxN, masks_MxN, losses_MxQ = _problem(seed=4, q=50)
    key = jax.random.key(7)
    a = lds(scores_QxN, masks_MxN, losses_MxQ, key=key)
    b = lds(scores_QxN, masks_MxN, losses_MxQ, key=key)
    c = lds(scores_QxN, masks_MxN, losses_MxQ, key=jax.random.key(8))
    lo, hi = a["ci95"]
    assert lo < a["lds"] < hi
    assert a["ci95"] == b["ci95"]
    assert a["ci95"] != c["ci95"]
    assert (
        lds(scores_QxN, masks_MxN, losses_MxQ)["ci95"]
        == lds(scores_QxN, masks_MxN, losses_MxQ, key=jax.random.key(0))["ci95"]
    )


def test_bootstrap_ci_shrinks_with_more_queries():
    rng = np.random.default_rng(5)
    m, n, q = 40, 30, 200
    true_QxN = rng.normal(size=(4 * q, n))
    masks_MxN = rng.random((m, n)) < 0.5
    losses_MxQ = -(masks_MxN @ true_QxN.T) + 3.0 * rng.normal(size=(m, 4 * q))
    small = lds(true_QxN[:q], masks_MxN, losses_MxQ[:, :q], kind="pearson")
    large = lds(true_QxN, masks_MxN, losses_MxQ, kind="pearson")
    width_small = small["ci95"][1] - small["ci95"][0]
    width_large = large["ci95"][1] - large["ci95"][0]
    # Standard error scales as 1/sqrt(Q): width should roughly halve.
    assert 0.35 < width_large / width_small < 0.7


def test_constant_queries_are_excluded():
    scores_QxN, masks_MxN, losses_MxQ = _problem(seed=6)
    scores_QxN[2] = 0.0  # constant prediction
    losses_MxQ[:, 5] = 1.5  # constant target
    for kind in ("spearman", "pearson", "kendall"):
        out = lds(scores_QxN, masks_MxN, losses_MxQ, kind=kind, n_boot=20)
        assert out["num_valid"] == Q - 2
        assert np.isnan(out["per_query"][[2, 5]]).all()
        assert out["lds"] == pytest.approx(np.nanmean(out["per_query"]))
        assert np.isfinite(out["ci95"]).all()


def test_all_queries_invalid_gives_nan():
    _, masks_MxN, losses_MxQ = _problem()
    out = lds(np.zeros((Q, N)), masks_MxN, losses_MxQ)
    assert out["num_valid"] == 0 and np.isnan(out["lds"]) and np.isnan(out["ci95"]).all()


def _gini_ref(x):
    x = np.sort(np.abs(x))
    n = x.size
    if x.sum() == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return np.sum((2 * i - n - 1) * x) / (n * x.sum())


def test_score_stats_matches_numpy():
    rng = np.random.default_rng(7)
    q, n = 9, 37
    scores_QxN = rng.standard_cauchy(size=(q, n))
    scores_QxN[rng.random((q, n)) < 0.4] = 0.0
    scores_QxN[3] = 0.0  # all-zero row: gini 0, coverage excluded
    stats = score_stats(scores_QxN)
    assert all(type(v) is float for v in stats.values())

    nnz_Q = (scores_QxN != 0).sum(1)
    k = int(np.ceil(0.1 * n))
    abs_QxN = np.abs(scores_QxN)
    coverage = [np.sort(r)[::-1][:k].sum() / r.sum() for r in abs_QxN if r.sum() > 0]
    assert stats["sparsity"] == pytest.approx(np.mean(scores_QxN == 0))
    assert stats["nnz_p50"] == pytest.approx(np.percentile(nnz_Q, 50))
    assert stats["nnz_p90"] == pytest.approx(np.percentile(nnz_Q, 90))
    assert stats["gini"] == pytest.approx(np.mean([_gini_ref(r) for r in scores_QxN]), rel=1e-5)
    assert stats["top10_coverage"] == pytest.approx(np.mean(coverage), rel=1e-5)


def test_score_stats_extremes():
    n = 30  # ceil(0.1 * 30) = 3, not 4 as naive float ceil would give
    equal = score_stats(np.ones((2, n)))
    assert equal["gini"] == pytest.approx(0.0, abs=1e-6)
    assert equal["top10_coverage"] == pytest.approx(3 / n)
    one_hot = np.zeros((2, n))
    one_hot[:, 4] = -2.0
    peaked = score_stats(one_hot)
    assert peaked["gini"] == pytest.approx((n - 1) / n)
    assert peaked["top10_coverage"] == pytest.approx(1.0)
    assert peaked["nnz_p50"] == 1.0 and peaked["sparsity"] == pytest.approx((n - 1) / n)
    assert np.isnan(score_stats(np.zeros((3, n)))["top10_coverage"])


def test_bad_inputs_raise():
    scores_QxN, masks_MxN, losses_MxQ = _problem()
    with pytest.raises(ValueError, match="scores_QxN has 40 columns but masks_MxN has 39"):
        lds(scores_QxN, masks_MxN[:, :-1], losses_MxQ)
    with pytest.raises(ValueError, match="scores_QxN has 40 columns but masks_MxN has 39"):
        predicted_responses(scores_QxN, masks_MxN[:, :-1])
    with pytest.raises(ValueError, match="masks_MxN has 30 rows but losses_MxQ has 29"):
        lds(scores_QxN, masks_MxN, losses_MxQ[:-1])
    with pytest.raises(ValueError, match="scores_QxN has 7 rows but losses_MxQ has 6 columns"):
        lds(scores_QxN, masks_MxN, losses_MxQ[:, :-1])
    bad = scores_QxN.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="scores_QxN contains NaN or inf"):
        lds(bad, masks_MxN, losses_MxQ)
    with pytest.raises(ValueError, match="scores_QxN contains NaN or inf"):
        score_stats(bad)
    bad = losses_MxQ.copy()
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="losses_MxQ contains NaN or inf"):
        lds(scores_QxN, masks_MxN, bad)
    with pytest.raises(ValueError, match="unknown kind 'tau'"):
        lds(scores_QxN, masks_MxN, losses_MxQ, kind="tau")
    with pytest.raises(ValueError, match="masks_MxN must be boolean"):
        lds(scores_QxN, masks_MxN * 2, losses_MxQ)
    with pytest.raises(ValueError, match="scores_QxN must be 2-D"):
        score_stats(scores_QxN[0])
    with pytest.raises(ValueError, match="n_boot must be >= 1"):
        lds(scores_QxN, masks_MxN, losses_MxQ, n_boot=0)


def test_paired_difference_is_exact_for_a_constant_shift_and_skips_nan():
    rng = np.random.default_rng(3)
    b = rng.normal(size=50)
    a = b + 0.125
    a[3], b[7] = np.nan, np.nan
    out = metrics.paired_difference(a, b, n_boot=200)
    assert out["mean"] == pytest.approx(0.125)
    assert out["ci95"] == pytest.approx([0.125, 0.125])


def test_paired_ci_is_narrower_than_unpaired_for_correlated_methods():
    rng = np.random.default_rng(4)
    base = rng.normal(size=200)
    a, b = base + 0.05 + 0.01 * rng.normal(size=200), base + 0.01 * rng.normal(size=200)
    paired = metrics.paired_difference(a, b, n_boot=500)
    assert 0.04 < paired["ci95"][0] < paired["mean"] < paired["ci95"][1] < 0.06
    with pytest.raises(ValueError, match="1-D of one shape"):
        metrics.paired_difference(a[:5], b)
