"""Tests for stride_jax.recover against scikit-learn's Lasso and dense numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso

from stride_jax.stride import lasso_cd, lasso_ws, recover, subsets
from stride_jax.stride.recover import LassoConfig, lasso_scores

T, N, D, Q = 60, 100, 4, 4
# Coefficients must match sklearn to 2e-4 of max|coef|. Observed worst over 20 seeds x 4 queries:
# 3e-5 (float32, maxiter=3000, tol=1e-7; sklearn in float64 with tol=1e-12). Problems are kept
# well posed (offset only with an intercept, b_true >= 0 for the non-negative variant): with
# ~T active coefficients the Lasso solution is near non-unique and only objectives agree.
COEF_RTOL = 2e-4
TIGHT = dict(maxiter=3000, tol=1e-7)
SOLVERS = pytest.mark.parametrize("solver", ["fista", "cd"])  # cd: stride/lasso_cd.py


def _problem(seed=0, t=T, n=N, q=Q, noise_Q=None, k=5, offset=2.0, positive=False):
    """Expander design and responses y = A b_true + noise + offset, sparse b_true per query."""
    design = subsets.expander(jax.random.PRNGKey(seed), t, n, D)
    a_TxN = design.dense().astype(np.float64)
    rng = np.random.default_rng(seed)
    b_QxN = np.zeros((q, n))
    for i in range(q):
        b_k = rng.normal(0.0, 3.0, k)
        b_QxN[i, rng.choice(n, k, replace=False)] = np.abs(b_k) if positive else b_k
    noise_Q = np.full(q, 0.5) if noise_Q is None else np.asarray(noise_Q)
    y_QxT = b_QxN @ a_TxN.T + noise_Q[:, None] * rng.normal(size=(q, t)) + offset
    return design, a_TxN, y_QxT


def _alpha_max(a_TxN, y_T, fit_intercept, nonneg=False):
    if fit_intercept:
        a_TxN, y_T = a_TxN - a_TxN.mean(0), y_T - y_T.mean()
    corr_N = a_TxN.T @ y_T / len(y_T)
    return corr_N.max() if nonneg else np.abs(corr_N).max()


def _sklearn(a_TxN, y_T, alpha, fit_intercept, positive=False):
    model = Lasso(
        alpha=alpha, fit_intercept=fit_intercept, positive=positive, tol=1e-12, max_iter=200_000
    )
    return model.fit(a_TxN, y_T).coef_


def _assert_close_to_sklearn(out, a_TxN, y_QxT, fit_intercept, positive=False):
    for q in range(y_QxT.shape[0]):
        ref_N = _sklearn(a_TxN, y_QxT[q], float(out["lam_Q"][q]), fit_intercept, positive)
        got_N = np.asarray(out["scores_QxN"][q])
        err = np.abs(got_N - ref_N).max() / (np.abs(ref_N).max() or 1.0)
        assert err < COEF_RTOL, (q, err)


@SOLVERS
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_matches_sklearn_lasso(fit_intercept, solver):
    design, a_TxN, y_QxT = _problem(seed=0, offset=2.0 if fit_intercept else 0.0)
    cfg = LassoConfig(lam_frac=0.05, fit_intercept=fit_intercept, solver=solver, **TIGHT)
    out = lasso_scores(design, jnp.asarray(y_QxT), cfg)
    assert out["scores_QxN"].shape == (Q, N) and out["scores_QxN"].dtype == jnp.float32
    lam_ref_Q = [0.05 * _alpha_max(a_TxN, y, fit_intercept) for y in y_QxT]
    np.testing.assert_allclose(out["lam_Q"], lam_ref_Q, rtol=1e-5)
    _assert_close_to_sklearn(out, a_TxN, y_QxT, fit_intercept)
    nnz_ref_Q = (np.asarray(out["scores_QxN"]) != 0).sum(-1)
    np.testing.assert_array_equal(out["nnz_Q"], nnz_ref_Q)


@SOLVERS
def test_nonneg_matches_sklearn_positive(solver):
    design, a_TxN, y_QxT = _problem(seed=1, positive=True)
    cfg = LassoConfig(lam_frac=0.05, nonneg=True, solver=solver, **TIGHT)
    out = lasso_scores(design.to_arrays(), y_QxT, cfg)
    assert float(out["scores_QxN"].min()) >= 0.0
    _assert_close_to_sklearn(out, a_TxN, y_QxT, fit_intercept=True, positive=True)


def test_masked_rows_equal_sklearn_on_kept_rows():
    """Rows with weight 0 are dropped: the fit (and its 1/(2T) scaling) uses the kept rows."""
    design, a_TxN, y_QxT = _problem(seed=5)
    keep_T = np.random.default_rng(5).random(T) > 0.2
    out = recover.lasso_scores_arrays(
        jnp.asarray(design.members_TxS),
        jnp.asarray(design.subsets_NxD),
        jnp.asarray(y_QxT, jnp.float32),
        jnp.asarray(keep_T, jnp.float32),
        0.05,
        recover.Solver(nonneg=False, fit_intercept=True, path_len=8, maxiter=TIGHT["maxiter"]),
    )
    a_kept, y_kept = a_TxN[keep_T], y_QxT[:, keep_T]
    lam_ref_Q = [0.05 * _alpha_max(a_kept, y, True) for y in y_kept]
    np.testing.assert_allclose(out["lam_Q"], lam_ref_Q, rtol=1e-5)
    _assert_close_to_sklearn(out, a_kept, y_kept, fit_intercept=True)


@SOLVERS
@pytest.mark.parametrize("nonneg", [False, True])
def test_lambda_max_is_the_zero_threshold(nonneg, solver):
    design, a_TxN, y_QxT = _problem(seed=2)
    cfg = dict(nonneg=nonneg, path_len=2, solver=solver)
    at_max = lasso_scores(design, y_QxT, LassoConfig(lam_frac=1.0, **cfg))
    assert float(jnp.abs(at_max["scores_QxN"]).max()) == 0.0
    np.testing.assert_array_equal(at_max["nnz_Q"], 0)
    ref_Q = [_alpha_max(a_TxN, y, True, nonneg) for y in y_QxT]
    np.testing.assert_allclose(at_max["lam_Q"], ref_Q, rtol=1e-5)
    below = lasso_scores(design, y_QxT, LassoConfig(lam_frac=0.97, **cfg))
    assert (np.asarray(below["nnz_Q"]) > 0).all()


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_gather_operators_equal_dense(fit_intercept):
    design, a_TxN, _ = _problem(seed=3)
    rng = np.random.default_rng(3)
    b_N, r_T = rng.normal(size=N), rng.normal(size=T)
    w_T = jnp.ones(T, jnp.float32)
    mv, rmv, _, n_used = recover._ops(
        jnp.asarray(design.members_TxS), jnp.asarray(design.subsets_NxD), w_T, fit_intercept
    )
    a_ref = a_TxN - a_TxN.mean(0) if fit_intercept else a_TxN
    np.testing.assert_allclose(mv(jnp.asarray(b_N, jnp.float32)), a_ref @ b_N, atol=1e-4)
    np.testing.assert_allclose(rmv(jnp.asarray(r_T, jnp.float32)), a_ref.T @ r_T, atol=1e-4)
    assert float(n_used) == T
    # Lipschitz constant: top eigenvalue of A_c^T A_c / T, overestimated by at most ~1%.
    lip = float(recover._lipschitz(mv, rmv, w_T, n_used, N))
    top = np.linalg.eigvalsh(a_ref.T @ a_ref / T).max()
    assert top <= lip <= 1.011 * top


@SOLVERS
def test_heldout_selection(solver):
    t, n = 200, 60
    # Query 0: clean signal; query 1: pure noise (b_true = 0); query 2: signal, heavy noise.
    design, a_TxN, y_QxT = _problem(seed=4, t=t, n=n, q=3, noise_Q=[0.05, 3.0, 3.0])
    y_QxT[1] = 2.0 + 3.0 * np.random.default_rng(5).normal(size=t)
    cfg = dict(select="heldout", holdout_frac=0.25, path_len=6, path_min_frac=0.005, **TIGHT)
    cfg = LassoConfig(solver=solver, **cfg)
    out = lasso_scores(design, y_QxT, cfg, key=jax.random.PRNGKey(0))
    lam_max_Q = np.array([_alpha_max(a_TxN, y, True) for y in y_QxT])
    frac_Q = np.asarray(out["lam_frac_Q"])
    fracs_K = 0.005 ** (np.arange(6) / 5)
    assert np.isclose(frac_Q[:, None], fracs_K, rtol=1e-5).any(-1).all()
    np.testing.assert_allclose(out["lam_Q"], frac_Q * lam_max_Q, rtol=1e-5)
    assert np.isfinite(np.asarray(out["scores_QxN"])).all()
    # The clean query is fitted with a smaller lambda fraction than the pure-noise query.
    assert frac_Q[0] < frac_Q[1]
    # Returned scores are the all-rows Lasso at the chosen lambda.
    _assert_close_to_sklearn(out, a_TxN, y_QxT, fit_intercept=True)


@pytest.mark.parametrize(
    ("y_change", "cfg", "match"),
    [
        ("nan", LassoConfig(), "y_QxT contain NaN or inf"),
        ("inf", LassoConfig(), "y_QxT contain NaN or inf"),
        ("wrong_t", LassoConfig(), "T=59 columns but the design has T=60"),
        ("1d", LassoConfig(), "must be 2-D"),
        (None, LassoConfig(lam_frac=0.0), "lam_frac must be > 0"),
        (None, LassoConfig(lam_frac=-0.1), "lam_frac must be > 0"),
        (None, LassoConfig(select="cv"), "unknown select"),
        (None, LassoConfig(select="heldout"), "needs a PRNG key"),
        (None, LassoConfig(solver="newton"), "unknown solver"),
        (None, LassoConfig(working_set=-1), "working_set must be >= 0"),
        (None, LassoConfig(working_set=8, solver="cd"), "needs solver='fista'"),
        (None, LassoConfig(working_set=8, select="heldout"), "select='fixed'"),
    ],
)
def test_bad_input_raises(y_change, cfg, match):
    design, _, y_QxT = _problem(seed=0)
    if y_change == "nan":
        y_QxT[1, 3] = np.nan
    elif y_change == "inf":
        y_QxT[0, 0] = np.inf
    elif y_change == "wrong_t":
        y_QxT = y_QxT[:, :-1]
    elif y_change == "1d":
        y_QxT = y_QxT[0]
    with pytest.raises(ValueError, match=match):
        lasso_scores(design, y_QxT, cfg)


def test_jaxopt_still_works_with_installed_jax():
    """Fails loudly if a jax upgrade breaks jaxopt's ProximalGradient / prox_lasso."""
    import jaxopt

    rng = np.random.default_rng(0)
    x_MxP = rng.normal(size=(30, 8))
    y_M = x_MxP @ np.array([2.0, -1.0, 0, 0, 0.5, 0, 0, 0]) + 0.1 * rng.normal(size=30)
    alpha = 0.1

    def loss(w_P, x, y):
        r = x @ w_P - y
        return 0.5 * jnp.mean(r * r)

    @jax.jit
    def solve(x, y):
        pg = jaxopt.ProximalGradient(fun=loss, prox=jaxopt.prox.prox_lasso, maxiter=5000, tol=1e-7)
        return pg.run(jnp.zeros(8), alpha, x, y).params

    got_P = solve(jnp.asarray(x_MxP, jnp.float32), jnp.asarray(y_M, jnp.float32))
    ref_P = _sklearn(x_MxP, y_M, alpha, fit_intercept=False)
    np.testing.assert_allclose(got_P, ref_P, atol=1e-4)


# --- solver="cd" (stride/lasso_cd.py): its cores, colouring and stopping rule ---------------


def _cd_args(design, y_QxT, blocks_CxB=None, w_T=None):
    """Positional arguments of ``lasso_cd.scores_arrays`` up to the row weights."""
    if blocks_CxB is None:
        blocks_CxB = lasso_cd.colour_blocks(design.subsets_NxD, design.num_subsets)
    w_T = jnp.ones(design.num_subsets, jnp.float32) if w_T is None else jnp.asarray(w_T)
    tables = (jnp.asarray(design.members_TxS), jnp.asarray(design.subsets_NxD))
    return (*tables, jnp.asarray(blocks_CxB), jnp.asarray(y_QxT, jnp.float32), w_T)


def _cd_fracs(end_frac, path_len):
    return recover._fracs(jnp.float32(end_frac), path_len)


def test_cd_masked_rows_equal_sklearn_on_kept_rows():
    design, a_TxN, y_QxT = _problem(seed=5)
    keep_T = np.random.default_rng(5).random(T) > 0.2
    settings = lasso_cd.Settings(nonneg=False, fit_intercept=True, **TIGHT)
    args = _cd_args(design, y_QxT, w_T=np.asarray(keep_T, np.float32))
    scores_QxN, lam_Q = lasso_cd.scores_arrays(*args, _cd_fracs(0.05, 8), settings)
    a_kept, y_kept = a_TxN[keep_T], y_QxT[:, keep_T]
    lam_ref_Q = [0.05 * _alpha_max(a_kept, y, True) for y in y_kept]
    np.testing.assert_allclose(lam_Q, lam_ref_Q, rtol=1e-5)
    out = {"scores_QxN": scores_QxN, "lam_Q": lam_Q}
    _assert_close_to_sklearn(out, a_kept, y_kept, fit_intercept=True)


@pytest.mark.parametrize("kind", ["expander", "bernoulli"])
def test_colour_blocks_partition_columns_into_independent_sets(kind):
    """Every column in exactly one block; no two columns of a block share a subset (so their
    coordinate updates touch disjoint residual rows and can run at once)."""
    design = subsets.make_design(jax.random.PRNGKey(7), kind, T, N, D)
    blocks_CxB = lasso_cd.colour_blocks(design.subsets_NxD, T)
    real = blocks_CxB[blocks_CxB < N]
    np.testing.assert_array_equal(np.sort(real), np.arange(N))
    a_TxN = design.dense()
    for block in blocks_CxB:
        assert a_TxN[:, block[block < N]].sum(1).max() <= 1
    if kind == "expander":  # the largest subset size is a lower bound on the colours
        assert len(blocks_CxB) <= design.sizes_T.max() + 2
    cached = lasso_cd.cached_blocks(np.asarray(design.subsets_NxD, np.int32), T)
    np.testing.assert_array_equal(cached, blocks_CxB)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_cd_centring_and_fitted_values_equal_dense(fit_intercept):
    design, a_TxN, y_QxT = _problem(seed=3)
    b_NxQ = np.random.default_rng(3).normal(size=(N, Q))
    settings = lasso_cd.Settings(nonneg=False, fit_intercept=fit_intercept, maxiter=1, tol=0.0)
    members, subs, blocks, y, ones_T = _cd_args(design, y_QxT)

    @jax.jit
    def pieces(y_TxQ, b_NxQ, ybar_Q):
        cd = lasso_cd._setup(members, subs, blocks, ones_T, settings)
        return (*cd.centre(y_TxQ), cd.fitted(b_NxQ, ybar_Q))

    ybar_ref_Q = y_QxT.mean(1) if fit_intercept else np.zeros(Q)
    yc_TxQ, ybar_Q, lam_max_Q, fitted_TxQ = pieces(
        y.T, jnp.asarray(b_NxQ, jnp.float32), jnp.asarray(ybar_ref_Q, jnp.float32)
    )
    np.testing.assert_allclose(ybar_Q, ybar_ref_Q, rtol=1e-5)
    np.testing.assert_allclose(yc_TxQ, (y_QxT - ybar_ref_Q[:, None]).T, atol=1e-4)
    lam_ref_Q = [_alpha_max(a_TxN, y, fit_intercept) for y in y_QxT]
    np.testing.assert_allclose(lam_max_Q, lam_ref_Q, rtol=1e-5)
    a_ref = a_TxN - a_TxN.mean(0) if fit_intercept else a_TxN
    np.testing.assert_allclose(fitted_TxQ, a_ref @ b_NxQ + ybar_ref_Q, atol=1e-4)


def _gap_and_objective(a_TxN, y_T, b_N, alpha, fit_intercept=True, positive=False):
    """scikit-learn's duality gap (``gap_enet``) / (||y_c||^2 / T) and the objective, float64."""
    if fit_intercept:
        a_TxN, y_T = a_TxN - a_TxN.mean(0), y_T - y_T.mean()
    t = len(y_T)
    r_T = y_T - a_TxN @ b_N
    xtr_N = a_TxN.T @ r_T
    dual = xtr_N.max() if positive else np.abs(xtr_N).max()
    const = min(1.0, alpha * t / dual) if dual > 0 else 1.0
    r2, l1 = r_T @ r_T, np.abs(b_N).sum()
    gap = 0.5 * r2 * (1 + const**2) + alpha * t * l1 - const * (r_T @ y_T)
    return gap / (y_T @ y_T), 0.5 * r2 / t + alpha * l1


@pytest.mark.parametrize("nonneg", [False, True])
@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_cd_duality_gap_within_tol_and_objective_near_sklearn_optimum(tol, nonneg):
    """For solver "cd" ``tol`` is scikit-learn's: each returned solution's gap (recomputed here
    in float64) is within tol * ||y_c||^2 / T, so its objective is at most that above the
    optimum (sklearn at tol 1e-12); the solver sums in float32: ~1e-7 of slack on the gap."""
    design, a_TxN, y_QxT = _problem(seed=6, positive=nonneg)
    cfg = LassoConfig(lam_frac=0.02, nonneg=nonneg, tol=tol, maxiter=5000, path_len=4, solver="cd")
    out = lasso_scores(design, y_QxT, cfg)
    slack = 1.02 * tol + 1e-7
    for q in range(Q):
        alpha = float(out["lam_Q"][q])
        b_N = np.asarray(out["scores_QxN"][q], np.float64)
        gap, obj = _gap_and_objective(a_TxN, y_QxT[q], b_N, alpha, positive=nonneg)
        ref_N = _sklearn(a_TxN, y_QxT[q], alpha, True, nonneg)
        ref_gap, ref_obj = _gap_and_objective(a_TxN, y_QxT[q], ref_N, alpha, positive=nonneg)
        y_c = y_QxT[q] - y_QxT[q].mean()
        assert ref_gap < 1e-9 and gap <= slack, (q, gap)
        assert ref_obj - 1e-6 * obj <= obj <= ref_obj + slack * (y_c @ y_c) / T, (q, obj)


def test_cd_objective_never_rises_over_sweeps():
    """A colour's updates are taken together; the centring term couples them, and each step
    majorises it, so the objective is non-increasing sweep by sweep (Bernoulli design: degrees
    differ, so the centring term differs between columns)."""
    design = subsets.bernoulli(jax.random.PRNGKey(8), T, N, D)
    a_TxN = design.dense().astype(np.float64)
    y_T = a_TxN[:, :5] @ np.array([3.0, -2.0, 1.0, 2.5, -1.5]) + 2.0
    y_T += np.random.default_rng(8).normal(size=T)
    alpha = 0.02 * _alpha_max(a_TxN, y_T, True)
    args = _cd_args(design, y_T[None])
    objectives = []
    for sweeps in (1, 2, 3, 6):  # each is a compile: maxiter is static
        settings = lasso_cd.Settings(nonneg=False, fit_intercept=True, maxiter=sweeps, tol=0.0)
        b_N = lasso_cd.scores_arrays(*args, _cd_fracs(0.02, 1), settings)[0][0]
        objectives.append(_gap_and_objective(a_TxN, y_T, np.asarray(b_N, np.float64), alpha)[1])
    assert np.all(np.diff(objectives) <= 1e-6 * objectives[0]), objectives


def test_cd_query_result_does_not_depend_on_its_batch():
    """Each query stops at its own gap and is then frozen: alone, in a batch, or in padded
    chunks of a batch it gets the same scores (up to float32 reduction order)."""
    design, _, y_QxT = _problem(seed=9, q=5)
    members, subs, blocks, y, ones_T = _cd_args(design, y_QxT)

    def scores(y_QxT, chunk):
        settings = lasso_cd.Settings(False, True, maxiter=500, tol=1e-5, query_chunk=chunk)
        args = (members, subs, blocks, y_QxT, ones_T, _cd_fracs(0.03, 3), settings)
        return np.asarray(lasso_cd.scores_arrays(*args)[0])

    together = scores(y, 0)
    atol = 1e-5 * np.abs(together).max()
    np.testing.assert_allclose(scores(y, 2), together, atol=atol)  # chunks 2 + 2 + (1 + pad)
    for q in (0, 3):
        np.testing.assert_allclose(scores(y[q : q + 1], 0)[0], together[q], atol=atol)


def test_cd_one_column_per_block_gives_the_same_solution():
    """One column per block is plain cyclic coordinate descent: the same optimum, slower."""
    design, _, y_QxT = _problem(seed=10)
    settings = lasso_cd.Settings(nonneg=False, fit_intercept=True, **TIGHT)
    fracs_K = _cd_fracs(0.05, 4)
    cyclic = lasso_cd.scores_arrays(
        *_cd_args(design, y_QxT, np.arange(N)[:, None]), fracs_K, settings
    )
    coloured = lasso_cd.scores_arrays(*_cd_args(design, y_QxT), fracs_K, settings)
    ref = np.abs(np.asarray(cyclic[0])).max()
    np.testing.assert_allclose(coloured[0], cyclic[0], atol=COEF_RTOL * ref)


# Working sets (stride/lasso_ws.py): FISTA on W columns at a time, checked on the full problem.
WS = dict(working_set=48, maxiter=300, tol=1e-6)  # N = 100; supports here are 15-37


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("nonneg", [False, True])
def test_working_set_matches_sklearn(fit_intercept, nonneg):
    design, a_TxN, y_QxT = _problem(
        seed=4, offset=2.0 if fit_intercept else 0.0, positive=nonneg, q=6
    )
    cfg = LassoConfig(lam_frac=0.05, fit_intercept=fit_intercept, nonneg=nonneg, **WS)
    out = lasso_scores(design, y_QxT, cfg)
    assert bool(np.all(out["ws_converged_Q"])), out["ws_converged_Q"]  # no fallback used
    lam_ref_Q = [0.05 * _alpha_max(a_TxN, y, fit_intercept, nonneg) for y in y_QxT]
    np.testing.assert_allclose(out["lam_Q"], lam_ref_Q, rtol=1e-5)
    _assert_close_to_sklearn(out, a_TxN, y_QxT, fit_intercept, positive=nonneg)


def test_working_set_too_small_falls_back_to_coordinate_descent():
    """A support larger than W cannot be represented: those queries are re-solved on all
    columns by coordinate descent at the same tolerance, so the scores equal its own."""
    design, a_TxN, y_QxT = _problem(seed=5, k=12, noise_Q=[0.01] * Q)
    ws = LassoConfig(lam_frac=0.01, working_set=4, maxiter=300, ws_rounds=5, tol=1e-7)
    cd = LassoConfig(lam_frac=0.01, solver="cd", path_len=1, maxiter=1500, tol=1e-7)
    full = lasso_scores(design, y_QxT, cd)
    assert int(np.min(full["nnz_Q"])) > 4
    out = lasso_scores(design, y_QxT, ws)
    assert not bool(np.any(out["ws_converged_Q"]))
    np.testing.assert_array_equal(out["scores_QxN"], full["scores_QxN"])
    _assert_close_to_sklearn(out, a_TxN, y_QxT, fit_intercept=True)


def test_working_set_query_result_does_not_depend_on_its_batch():
    design, _, y_QxT = _problem(seed=6, q=8)
    cfg = LassoConfig(lam_frac=0.05, **WS)
    together = lasso_scores(design, y_QxT, cfg)["scores_QxN"]
    alone = lasso_scores(design, y_QxT[3:4], cfg)["scores_QxN"]
    np.testing.assert_allclose(alone[0], together[3], atol=1e-6)


def test_working_set_gram_equals_dense_centred_columns():
    design, a_TxN, _ = _problem(seed=7)
    cols = np.array([3, 17, 17 % N, 42, N])  # a repeat and the empty slot N
    sub_pad = np.concatenate([design.subsets_NxD, np.full((1, D), T)])
    w_pad = jnp.concatenate([jnp.ones(T), jnp.zeros(1)])
    mu_pad = np.concatenate([a_TxN.mean(0), [0.0]])
    got = lasso_ws.gram(jnp.asarray(sub_pad[cols]), jnp.asarray(mu_pad[cols]), w_pad, T, True)
    a_pad = np.concatenate([a_TxN - a_TxN.mean(0), np.zeros((T, 1))], 1)[:, cols]
    np.testing.assert_allclose(got, a_pad.T @ a_pad / T, atol=1e-6)
