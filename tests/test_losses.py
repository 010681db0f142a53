"""Stage-1 losses against plain numpy / scipy references."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, rel_entr, softmax

from stride_jax.stride.losses import (
    fidelity,
    linearity,
    ridge_residual,
    stability,
    truncated_kl,
    weighted_mean,
)

K, B, C = 4, 6, 7


def rand(shape, seed, scale=2.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def np_fidelity(logits, y, w):
    logits = logits.astype(np.float64)
    out = np.zeros(logits.shape[0])
    for k in range(logits.shape[0]):
        lp = log_softmax(logits[k], axis=-1)
        ce = np.array([-lp[b, y[k, b]] for b in range(logits.shape[1])])
        out[k] = (ce * w[k]).sum() / max(w[k].sum(), 1e-9)
    return out


def np_truncated_kl(base, steer, top_k):
    base, steer = base.astype(np.float64), steer.astype(np.float64)
    kk, bb, c = base.shape
    top_k = min(top_k, c)
    out = np.zeros((kk, bb))
    for k in range(kk):
        for b in range(bb):
            idx = np.argsort(-base[k, b])[:top_k]
            p = softmax(base[k, b, idx])
            q = softmax(steer[k, b, idx])
            out[k, b] = np.sum(p * np.log(p / q))
    return out


def np_ridge_residual(y, x, ridge):
    y, x = y.astype(np.float64), x.astype(np.float64)
    k, m = x.shape
    beta = np.linalg.solve(x.T @ x + ridge * np.eye(m), x.T @ y)
    r = y - x @ beta
    return np.mean(np.sum(r**2, axis=0)) / k


def test_weighted_mean_matches_numpy_and_zero_weights():
    x, w = rand((K, B), 0), np.abs(rand((K, B), 1))
    w[2] = 0.0  # all-zero weights: 0 / max(0, eps) = 0, not NaN
    got = np.asarray(weighted_mean(jnp.asarray(x), jnp.asarray(w)))
    ref = np.array([(x[k] * w[k]).sum() / w[k].sum() if k != 2 else 0.0 for k in range(K)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_fidelity_matches_numpy():
    logits = rand((K, B, C), 2)
    y = np.random.default_rng(3).integers(0, C, size=(K, B))
    w = (np.random.default_rng(4).random((K, B)) < 0.6).astype(np.float32)
    w[:, 0] = 1.0
    got = np.asarray(fidelity(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(w)))
    assert got.shape == (K,)
    np.testing.assert_allclose(got, np_fidelity(logits, y, w), rtol=1e-5, atol=1e-5)


def test_fidelity_fractional_weights_and_masking():
    """Masked entries do not matter, whatever their logits."""
    logits = rand((K, B, C), 5)
    y = np.random.default_rng(6).integers(0, C, size=(K, B))
    w = np.random.default_rng(7).random((K, B)).astype(np.float32)
    w[:, -2:] = 0.0
    got = np.asarray(fidelity(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(w)))
    np.testing.assert_allclose(got, np_fidelity(logits, y, w), rtol=1e-5, atol=1e-5)
    logits2 = logits.copy()
    logits2[:, -2:] = 100.0 * rand((K, 2, C), 8)
    got2 = np.asarray(fidelity(jnp.asarray(logits2), jnp.asarray(y), jnp.asarray(w)))
    np.testing.assert_allclose(got2, got, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_truncated_kl_matches_numpy(top_k):
    base = rand((K, B, C), 10)
    steer = base + rand((K, B, C), 11, scale=1.0)
    got = np.asarray(truncated_kl(jnp.asarray(base), jnp.asarray(steer), top_k))
    assert got.shape == (K, B)
    ref = np_truncated_kl(base, steer, top_k)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert np.all(got >= -1e-6)
    if top_k == 1:
        np.testing.assert_allclose(got, 0.0, atol=1e-6)  # one class: both renormalise to 1


def test_truncated_kl_ignores_classes_outside_base_top_k():
    base = rand((K, B, C), 12)
    steer = base + rand((K, B, C), 13, scale=1.0)
    top_k = 3
    order = np.argsort(-base, axis=-1)
    outside = order[..., top_k:]
    steer2 = steer.copy()
    np.put_along_axis(steer2, outside, 50.0, axis=-1)  # change only non-top-K logits
    a = truncated_kl(jnp.asarray(base), jnp.asarray(steer), top_k)
    b = truncated_kl(jnp.asarray(base), jnp.asarray(steer2), top_k)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Shifting all steered logits of a row by a constant does not change the KL.
    c = truncated_kl(jnp.asarray(base), jnp.asarray(steer + 3.0), top_k)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)
    # Identical logits: zero KL.
    np.testing.assert_allclose(truncated_kl(jnp.asarray(base), jnp.asarray(base), top_k), 0.0)


@pytest.mark.parametrize("top_k", [C, C + 5, 1000])
def test_truncated_kl_full_when_top_k_covers_all(top_k):
    base = rand((K, B, C), 14)
    steer = rand((K, B, C), 15)
    got = np.asarray(truncated_kl(jnp.asarray(base), jnp.asarray(steer), top_k))
    p = softmax(base.astype(np.float64), axis=-1)
    q = softmax(steer.astype(np.float64), axis=-1)
    ref = rel_entr(p, q).sum(-1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_stability_matches_numpy():
    base = rand((K, B, C), 16)
    steer = base + rand((K, B, C), 17, scale=0.7)
    w = np.random.default_rng(18).random((K, B)).astype(np.float32)
    w[1] = 0.0
    top_k = 4
    got = np.asarray(stability(jnp.asarray(base), jnp.asarray(steer), jnp.asarray(w), top_k))
    kl = np_truncated_kl(base, steer, top_k)
    ref = np.array([(kl[k] * w[k]).sum() / max(w[k].sum(), 1e-9) for k in range(K)])
    assert got.shape == (K,)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert got[1] == 0.0


@pytest.mark.parametrize("ridge", [1e-3, 0.5, 10.0])
@pytest.mark.parametrize("kk,m,p", [(12, 3, 5), (8, 8, 2), (6, 10, 4)])
def test_ridge_residual_matches_numpy(ridge, kk, m, p):
    y = rand((kk, p), 20, scale=1.0)
    x = rand((kk, m), 21, scale=1.0)
    got = float(ridge_residual(jnp.asarray(y), jnp.asarray(x), ridge))
    ref = np_ridge_residual(y, x, ridge)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-6)
    # linearity is the same quantity
    got_lin = float(linearity(jnp.asarray(y), jnp.asarray(x), ridge))
    np.testing.assert_allclose(got_lin, got, rtol=1e-6)


def test_ridge_residual_zero_in_span():
    kk, m, p = 20, 4, 3
    x = rand((kk, m), 22, scale=1.0)
    y = x @ rand((m, p), 23, scale=1.0)
    scale = float(np.mean(np.sum(y.astype(np.float64) ** 2, 0)) / kk)
    got = float(ridge_residual(jnp.asarray(y), jnp.asarray(x), 1e-6))
    assert got < 1e-5 * scale
    # Not in span: residual equals the energy of the component orthogonal to col(X).
    rng = np.random.default_rng(24)
    noise = rng.normal(size=(kk, p))
    q, _ = np.linalg.qr(x.astype(np.float64))
    orth = noise - q @ (q.T @ noise)
    y2 = (y + orth).astype(np.float32)
    got2 = float(ridge_residual(jnp.asarray(y2), jnp.asarray(x), 1e-6))
    np.testing.assert_allclose(got2, np.mean(np.sum(orth**2, 0)) / kk, rtol=1e-3)


def test_ridge_residual_monotone_in_ridge_and_bounded():
    """||y - X b_lambda||^2 grows with lambda and never exceeds ||y||^2 (b = 0 is feasible)."""
    y = rand((10, 3), 25, scale=1.0)
    x = rand((10, 4), 26, scale=1.0)
    vals = [
        float(ridge_residual(jnp.asarray(y), jnp.asarray(x), lam)) for lam in [0.01, 1, 10, 1e3]
    ]
    assert all(a <= b * (1 + 1e-5) for a, b in zip(vals, vals[1:], strict=False))
    bound = float(np.mean(np.sum(y.astype(np.float64) ** 2, 0)) / 10)
    assert vals[-1] <= bound
    assert vals[-1] > 0.9 * bound  # huge ridge: beta ~ 0, residual ~ ||y||^2


def test_ridge_residual_invariant_to_column_basis():
    """With ridge ~ 0 the fit depends only on col(X): X -> X R (R invertible) changes nothing,
    and adding any X c to y changes nothing."""
    kk, m, p = 15, 3, 4
    x = rand((kk, m), 27, scale=1.0)
    y = rand((kk, p), 28, scale=1.0)
    r = np.array([[2.0, 0.5, 0.0], [0.0, 1.0, -1.0], [0.3, 0.0, 1.5]], np.float32)
    base = float(ridge_residual(jnp.asarray(y), jnp.asarray(x), 1e-6))
    np.testing.assert_allclose(
        float(ridge_residual(jnp.asarray(y), jnp.asarray(x @ r), 1e-6)), base, rtol=1e-3
    )
    y_shift = y + x @ rand((m, p), 29, scale=1.0)
    np.testing.assert_allclose(
        float(ridge_residual(jnp.asarray(y_shift), jnp.asarray(x), 1e-6)), base, rtol=1e-3
    )


def test_weighted_ridge_residual_matches_per_column_numpy_fits():
    """Row weights: each probe column is fitted on its own rows (plain numpy loop reference)."""
    rng = np.random.default_rng(7)
    k, m, p, ridge = 12, 3, 5, 0.3
    x = rng.normal(size=(k, m)).astype(np.float32)
    y = rng.normal(size=(k, p)).astype(np.float32)
    w = (rng.random((k, p)) > 0.3).astype(np.float32)
    expected = []
    for col in range(p):
        rows = w[:, col] > 0
        xr, yr = x[rows].astype(np.float64), y[rows, col].astype(np.float64)
        beta = np.linalg.solve(xr.T @ xr + ridge * np.eye(m), xr.T @ yr)
        expected.append(((yr - xr @ beta) ** 2).sum() / rows.sum())
    got = ridge_residual(jnp.asarray(y), jnp.asarray(x), ridge, jnp.asarray(w))
    np.testing.assert_allclose(float(got), np.mean(expected), rtol=1e-4)
