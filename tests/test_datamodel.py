"""Datamodel baseline and noise ceiling against scikit-learn / scipy / plain references."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats
from conftest import tiny_config
from sklearn.linear_model import Ridge

from stride_jax import methods, sharding, tasks
from stride_jax.data import Dataset, corpora, load_digits
from stride_jax.eval import groundtruth
from stride_jax.methods import datamodel
from stride_jax.models import mlp, transformer
from stride_jax.stride import subsets


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
    graphdef, params = mlp.abstract(c.model, splits.train.x_NxF.shape[1], splits.num_classes)
    task = tasks.mlp_task(c.model, graphdef, params, splits, mesh=mesh)
    same = datamodel.ceiling_losses(task, gt["masks_MxN"], init_key, splits.query, group=4)
    np.testing.assert_allclose(same, gt["losses_MxQ"], atol=1e-5)
    other = datamodel.ceiling_losses(
        task, gt["masks_MxN"], jax.random.key(99), splits.query, group=4
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
    task = tasks.mlp_task(c.model, graphdef, params, splits, mesh=mesh)
    cfg = datamodel.default_config("classifier")
    cfg.update(num_models=40, models_per_batch=20, seed=11, ridge=2.0)
    method = methods.get("datamodel", "classifier")
    state = method.fit(task, cfg)
    masks = np.asarray(state["masks_MxE"])
    assert masks.shape == (40, 60) and (masks.sum(1) == 30).all()
    gt_masks = subsets.retention_masks(jax.random.split(jax.random.key(1))[0], 40, 60, 0.5)
    assert not np.array_equal(masks, gt_masks)  # own seed, not the ground truth's
    scores = method.score(task, state, splits.query, cfg)
    assert scores.shape == (8, 60) and scores.dtype == np.float32
    # Reference: retrains via groundtruth (same masks and keys), ridge via scikit-learn.
    params_M = groundtruth.retrain_many(c.model, state["keys_M"], x, y, masks, 10, mesh, 20)
    losses = np.asarray(
        groundtruth.query_losses(
            c.model, params_M, jnp.asarray(splits.query.x_NxF), splits.query.y_N, 10
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
    assert not np.array_equal(np.asarray(method.fit(task, cfg2)["masks_MxE"]), masks)
    # Other query rows than the task's: retrained with the same masks and keys.
    q = splits.query
    again = method.score(task, state, Dataset(q.x_NxF[:3], q.y_N[:3], q.ids_N[:3]), cfg)
    np.testing.assert_allclose(again, scores[:3], rtol=1e-4, atol=1e-6)


def test_datamodel_on_a_decoder_is_a_ridge_on_its_retrains():
    sp = corpora.load_shakespeare(block_len=16, n_train=24, n_val=0, n_query=3, seed=0)
    arch = transformer.DecoderConfig(
        family="gpt2",
        vocab_size=sp.tokenizer.vocab_size,
        d_model=8,
        n_layers=1,
        n_heads=2,
        max_len=16,
    )
    gd, p0 = transformer.build(arch, jax.random.key(0))
    recipe = ml_collections.ConfigDict(
        dict(steps=3, batch=8, lr=1e-2, warmup_steps=1, lr_end_frac=0.1, clip=1.0, weight_decay=0.0)
    )
    task = tasks.decoder((gd, p0), train=sp.train, queries=sp.query, recipe=recipe, params0=p0)
    cfg = datamodel.default_config("decoder")
    cfg.update(num_models=6, models_per_batch=3, ridge=1.0)
    method = methods.get("datamodel", "decoder")
    state = method.fit(task, cfg)
    scores = method.score(task, state, sp.query, cfg)
    assert scores.shape == (3, 24) and np.isfinite(scores).all()
    masks = np.asarray(state["masks_MxE"], np.float64)
    losses = np.stack(  # one retrain at a time, by the task's own recipe
        [
            np.asarray(task.row_losses(sp.query, task.retrain(k, task.example_weights(m[None])[0])))
            for k, m in zip(state["keys_M"], masks, strict=True)
        ]
    )
    want = np.stack([Ridge(alpha=1.0).fit(masks, -losses[:, q]).coef_ for q in range(3)])
    np.testing.assert_allclose(task.sum_to_examples(scores), want, rtol=1e-3, atol=1e-5)
