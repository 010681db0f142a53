"""Datamodel baseline and noise ceiling against scikit-learn / scipy / plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import tiny_config
from sklearn.linear_model import Ridge

from stride_jax import groundtruth, sharding, subsets
from stride_jax.baselines import base, datamodel
from stride_jax.data import load_digits
from stride_jax.models import mlp


@pytest.mark.parametrize("m,n", [(30, 12), (12, 30)])  # primal (N <= M) and dual (M < N)
def test_ridge_equals_sklearn(m, n):
    rng = np.random.default_rng(0)
    masks = rng.random((m, n)) < 0.5
    coef_true = rng.normal(size=(n, 3))
    targets = masks @ coef_true + 0.3 * rng.normal(size=(m, 3)) + 2.0
    for lam in (0.5, 10.0):
        got = np.asarray(datamodel.ridge_coefficients(masks, targets, lam))
        want = np.stack(
            [
                Ridge(alpha=lam, fit_intercept=True).fit(masks.astype(float), targets[:, q]).coef_
                for q in range(3)
            ],
            axis=1,
        )
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_ridge_rejects_zero_penalty():
    with pytest.raises(ValueError, match="ridge must be > 0"):
        datamodel.ridge_coefficients(np.ones((3, 2)), np.ones((3, 1)), 0.0)


def test_retrain_agreement_equals_scipy_loop():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(25, 7)).astype(np.float32)
    b = (0.6 * a + rng.normal(size=(25, 7))).astype(np.float32)
    b[:, 3] = 1.0  # a constant query is left out, as in LDS
    a[5, 0] = a[6, 0]  # a tie
    out = datamodel.retrain_agreement(a, b, n_boot=200)
    want = np.array(
        [
            scipy.stats.spearmanr(-a[:, q], -b[:, q]).statistic if q != 3 else np.nan
            for q in range(7)
        ]
    )
    np.testing.assert_allclose(out["per_query"], want, atol=1e-5)
    assert out["num_valid"] == 6
    np.testing.assert_allclose(out["lds"], np.nanmean(want), atol=1e-5)
    assert out["ci95"][0] <= out["lds"] <= out["ci95"][1]
    same = datamodel.retrain_agreement(a, a, n_boot=50)
    np.testing.assert_allclose(same["lds"], 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def setup():
    c = tiny_config()
    c.groundtruth.update(num_models=8, models_per_batch=4, seed=1)
    splits = load_digits(n_train=60, n_query=8)
    return c, splits, sharding.make_mesh()


def test_noise_ceiling_retrains_the_same_masks(setup):
    c, splits, mesh = setup
    gt = groundtruth.build(c.groundtruth, c.model, splits, mesh)
    # groundtruth.build draws its init keys as split(split(key(seed))[1], M): with that key
    # the noise-ceiling retrains must reproduce the ground truth exactly (same masks used).
    init_key = jax.random.split(jax.random.key(c.groundtruth.seed))[1]
    same = datamodel.noise_ceiling(c.model, splits, gt["masks_MxN"], init_key, mesh, batch=4)
    np.testing.assert_allclose(same, gt["losses_MxQ"], atol=1e-5)
    other = datamodel.noise_ceiling(
        c.model, splits, gt["masks_MxN"], jax.random.key(99), mesh, batch=4
    )
    assert other.shape == gt["losses_MxQ"].shape and other.dtype == np.float32
    assert not np.allclose(other, gt["losses_MxQ"], atol=1e-4)
    agree = datamodel.retrain_agreement(gt["losses_MxQ"], other, n_boot=50)
    assert -1.0 <= agree["lds"] <= 1.0


def test_datamodel_fit_score(setup):
    c, splits, mesh = setup
    x, y = jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N)
    params = mlp.fit(c.model, jax.random.key(0), x, y, jnp.ones(60), splits.num_classes)
    graphdef, _ = mlp.abstract(c.model, x.shape[1], splits.num_classes)
    task = base.Task(c.model, graphdef, params, splits.train, splits.num_classes, mesh=mesh)
    cfg = datamodel.default_config()
    cfg.update(num_models=40, models_per_batch=20, seed=11, ridge=2.0)
    method = base.get("datamodel")
    state = method.fit(task, cfg)
    masks = np.asarray(state["masks_MxN"])
    assert masks.shape == (40, 60) and (masks.sum(1) == 30).all()
    gt_masks = subsets.retention_masks(jax.random.split(jax.random.key(1))[0], 40, 60, 0.5)
    assert not np.array_equal(masks, gt_masks)  # own seed, not the ground truth's
    scores = method.score(task, state, splits.query, cfg)
    assert scores.shape == (8, 60) and scores.dtype == np.float32
    # Reference: losses via groundtruth.query_losses, ridge via scikit-learn.
    losses = np.asarray(
        groundtruth.query_losses(
            c.model, state["params_M"], jnp.asarray(splits.query.x_NxF), splits.query.y_N, 10
        ),
        np.float64,
    )
    want = np.stack(
        [Ridge(alpha=2.0).fit(masks.astype(float), -losses[:, q]).coef_ for q in range(8)]
    )
    np.testing.assert_allclose(scores, want, rtol=1e-3, atol=1e-5)
    # A ridge-only change reuses the retrains (a tuning sweep does not redo them) ...
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.ridge = 20.0
    assert method.fit(task, cfg2) is state
    assert not np.allclose(method.score(task, state, splits.query, cfg2), scores)
    # ... while another seed retrains.
    cfg2.seed = 12
    assert not np.array_equal(np.asarray(method.fit(task, cfg2)["masks_MxN"]), masks)
