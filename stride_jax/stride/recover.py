"""Stage 2b: recover per-example scores from per-subset responses by a batched Lasso.

For each query q, with responses ``y_T`` (one per subset) and the design ``A_TxN``, solve

    min_b  1/(2 T') sum_t w_t ((A_c b)_t - (y_c)_t)^2 + lam ||b||_1      (optionally b >= 0)

in scikit-learn's scaling (``T' = sum_t w_t``, the rows actually used; ``w`` masks held-out
rows). With ``fit_intercept`` the columns of A and y are centred implicitly on the used rows
(``A_c = A - 1 mu^T``), exactly like ``sklearn.linear_model.Lasso``. A is only applied through
its gather form (``members_TxS`` / ``subsets_NxD``, see :mod:`stride_jax.subsets`). Solves use
jaxopt's FISTA with the fixed step 1/L (L from power iteration), warm-started along a geometric
lambda path under ``lax.scan``. With a fixed lambda fraction all queries are one batched solve
(the columns of an N x Q matrix; the objective is separable, so each column's iterates are its
query's own); the held-out selection is vmapped over queries. ``solver="cd"`` opts in to
:mod:`stride_jax.stride.lasso_cd` instead: batched coordinate descent on the same problem, which
stops each query at scikit-learn's duality-gap tolerance; on CPU it is several times faster than
scikit-learn's coordinate descent looped over queries, where this FISTA is slower (BENCHMARKS.md,
"Lasso: batched JAX vs scikit-learn coordinate descent"). ``working_set=W`` runs the same FISTA
on at most W columns at a time (:mod:`stride_jax.stride.lasso_ws`): for sparse solutions at
large N (the paper's T << N), where each full step would touch every column.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax import resources, sharding
from stride_jax.stride import lasso_cd, lasso_ws
from stride_jax.stride.subsets import Design

# jaxopt warns on import that it is no longer maintained. We depend on it knowingly (its FISTA
# is all we use; tests/test_recover.py::test_jaxopt_still_works_with_installed_jax fails if a
# jax upgrade breaks it, and setup.py bounds jax below the next minor), so the warning is
# silenced here, once, rather than shown to every user and test run.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
    )
    import jaxopt

_POWER_ITERS = 100
_LIPSCHITZ_SAFETY = 1.01
_SELECTS = ("fixed", "heldout")
_SOLVERS = ("fista", "cd")


@dataclasses.dataclass(frozen=True)
class LassoConfig:
    """Lasso settings; lambda is always a fraction of each query's lambda_max."""

    lam_frac: float = 0.05  # lambda = lam_frac * lambda_max (per query)
    nonneg: bool = False
    fit_intercept: bool = True
    maxiter: int = 500  # FISTA iterations (solver "cd": at most this many sweeps) per path point
    tol: float = 1e-6  # solver "cd" and working sets: a query stops at duality gap <= tol *
    # ||y_c||^2 / T' (scikit-learn's rule). FISTA runs exactly maxiter steps per path point: an
    # absolute tolerance on ||b_k+1 - b_k|| * L stopped queries with small responses after a
    # few steps (MNIST-5k at T = N/4, validation LDS 0.649 with it, 0.678 without).
    path_len: int = 8  # warm-started path from lambda_max down to lam_frac*lambda_max (geometric)
    select: str = "fixed"  # "fixed": use lam_frac; "heldout": choose per query on held-out rows
    holdout_frac: float = 0.1
    path_min_frac: float = 0.005  # smallest fraction considered when select == "heldout"
    solver: str = "fista"  # "fista" (jaxopt) or "cd" (opt-in coordinate descent, lasso_cd.py)
    # > 0: FISTA on working sets of this many columns (lasso_ws.py; select "fixed" only), tol is
    # then the duality-gap rule of solver "cd" and maxiter the steps per restricted solve; a
    # query whose gap does not close in ws_rounds rounds is re-solved on all columns by
    # coordinate descent (solver "cd") at the same tolerance.
    working_set: int = 0
    ws_rounds: int = 20


def _col(v_T, like):
    """``v`` (one value per leading index) shaped to broadcast against ``like`` (T or T x Q)."""
    return v_T.reshape(v_T.shape + (1,) * (like.ndim - 1))


def _ops(members_TxS, subsets_NxD, w_T, fit_intercept: bool):
    """Weighted, optionally centred operators: (matvec N->T, rmatvec T->N, mu_N, T'). They
    take one vector (N / T) or a batch of columns (N x Q / T x Q, one per query)."""
    n_used = jnp.sum(w_T)

    def pad(x):  # a zero row for the design tables' padding index
        return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])

    def a_mv(b_N):  # A @ b
        return pad(b_N)[members_TxS].sum(1)

    def a_rmv(r_T):  # A.T @ r
        return pad(r_T)[subsets_NxD].sum(1)

    mu_N = a_rmv(w_T) / n_used if fit_intercept else jnp.zeros(subsets_NxD.shape[0], jnp.float32)

    def mv(b_N):
        return a_mv(b_N) - jnp.tensordot(mu_N, b_N, axes=1)

    def rmv(r_T):
        return a_rmv(r_T) - _col(mu_N, r_T) * jnp.sum(r_T, 0)

    return mv, rmv, mu_N, n_used


def _lipschitz(mv, rmv, w_T, n_used, num_examples: int):
    """Largest eigenvalue of A_c^T W A_c / T' by power iteration, times a safety factor."""
    v0 = jax.random.normal(jax.random.PRNGKey(0), (num_examples,), jnp.float32)

    def body(_, v):
        u = rmv(w_T * mv(v)) / n_used
        return u / jnp.maximum(jnp.linalg.norm(u), 1e-30)

    v = jax.lax.fori_loop(0, _POWER_ITERS, body, v0 / jnp.linalg.norm(v0))
    return jnp.maximum(jnp.linalg.norm(rmv(w_T * mv(v)) / n_used), 1e-12) * _LIPSCHITZ_SAFETY


def _fracs(end_frac, path_len: int):
    """Geometric fractions 1.0 -> end_frac (path_len points; just end_frac when path_len == 1)."""
    if path_len == 1:
        return jnp.reshape(jnp.asarray(end_frac, jnp.float32), (1,))
    return jnp.asarray(end_frac, jnp.float32) ** (jnp.arange(path_len) / (path_len - 1.0))


def _setup(members_TxS, subsets_NxD, w_T, fit_intercept, nonneg, maxiter):
    """Operators, centring and a FISTA solver for one row weighting (shared by all queries)."""
    w_T = jnp.asarray(w_T, jnp.float32)
    mv, rmv, _, n_used = _ops(members_TxS, subsets_NxD, w_T, fit_intercept)
    step = 1.0 / _lipschitz(mv, rmv, w_T, n_used, subsets_NxD.shape[0])

    def value_and_grad(b_N, yc_T):  # one query, or the sum over a batch of columns
        r_T = mv(b_N) - yc_T
        wr_T = _col(w_T, r_T) * r_T
        return 0.5 * jnp.sum(wr_T * r_T) / n_used, rmv(wr_T) / n_used

    solver = jaxopt.ProximalGradient(
        fun=value_and_grad,
        value_and_grad=True,
        prox=jaxopt.prox.prox_non_negative_lasso if nonneg else jaxopt.prox.prox_lasso,
        stepsize=lambda _: step,  # callable => fixed step, no line search (step is traced)
        maxiter=maxiter,
        tol=0.0,  # exactly maxiter steps (LassoConfig.tol): the same for every query and batch
        acceleration=True,
        implicit_diff=False,
    )

    def centre(y_T):
        """(y_c, ybar, lambda_max) on the weighted rows, for one query (T) or per column of
        a batch (T x Q)."""
        w = _col(w_T, y_T)
        ybar = jnp.sum(w * y_T, 0) / n_used if fit_intercept else jnp.zeros(y_T.shape[1:])
        yc_T = y_T - ybar
        grad0_N = rmv(w * yc_T) / n_used
        lam_max = jnp.max(grad0_N if nonneg else jnp.abs(grad0_N), axis=0)
        return yc_T, ybar, jnp.maximum(lam_max, 0.0)

    def solve(b_N, yc_T, lam_max, frac):
        """Lasso at frac * lam_max from b_N (one query, or a batch of columns with one
        lam_max each: one FISTA run on their sum, which is separable, so the iterates are
        each query's own, whatever the batch).
        By KKT b = 0 when frac >= 1; set it exactly, since float32 sums of the gradient in and
        out of the solver can differ by an ulp."""
        b_N = solver.run(b_N, frac * lam_max, yc_T).params
        return jnp.where(frac >= 1.0, jnp.zeros_like(b_N), b_N)

    return mv, centre, solve


def _solver_args(solver) -> tuple:
    """(fit_intercept, nonneg, maxiter): ``_setup``'s settings."""
    return solver.fit_intercept, solver.nonneg, solver.maxiter


def _result(scores_QxN, lam_Q, lam_frac_Q) -> dict:
    nnz_Q = jnp.sum(scores_QxN != 0, -1)
    return {"scores_QxN": scores_QxN, "lam_Q": lam_Q, "lam_frac_Q": lam_frac_Q, "nnz_Q": nnz_Q}


class Solver(NamedTuple):
    """The static (compile-time) settings of the jitted FISTA cores (no tolerance: FISTA runs
    exactly ``maxiter`` steps per path point, see ``LassoConfig.tol``)."""

    nonneg: bool
    fit_intercept: bool
    maxiter: int
    path_len: int


@partial(jax.jit, static_argnames="solver")
def lasso_scores_arrays(
    members_TxS,
    subsets_NxD,
    y_QxT,
    row_weight_T,
    lam_frac,
    solver: Solver,
) -> dict:
    """Jitted core: Lasso at ``lam_frac * lambda_max`` per query, warm-started along a path.

    Args: ``members_TxS`` / ``subsets_NxD`` int32 design tables, ``y_QxT`` float32 responses,
    ``row_weight_T`` float32 row weights (1 = used, 0 = masked out), ``lam_frac`` scalar.
    Returns ``{"scores_QxN", "lam_Q", "lam_frac_Q", "nnz_Q"}``.
    """
    _, centre, solve = _setup(members_TxS, subsets_NxD, row_weight_T, *_solver_args(solver))
    fracs_K = _fracs(lam_frac, solver.path_len)
    num_examples = subsets_NxD.shape[0]
    # All queries in one batched solve (columns of N x Q), not a vmap over per-query solves:
    # the design's gathers then move Q contiguous floats per index, and FISTA's loop runs once.
    yc_TxQ, _, lam_max_Q = centre(jnp.asarray(y_QxT, jnp.float32).T)

    def step(b_NxQ, frac):
        return solve(b_NxQ, yc_TxQ, lam_max_Q, frac), None

    zeros = jnp.zeros((num_examples, yc_TxQ.shape[1]), jnp.float32)
    b_NxQ, _ = jax.lax.scan(step, zeros, fracs_K)
    lam_Q = fracs_K[-1] * lam_max_Q
    return _result(b_NxQ.T, lam_Q, jnp.full(lam_Q.shape, fracs_K[-1]))


@partial(jax.jit, static_argnames="solver")
def lasso_heldout_arrays(
    members_TxS,
    subsets_NxD,
    y_QxT,
    fit_mask_T,
    path_min_frac,
    solver: Solver,
) -> dict:
    """Jitted core for ``select="heldout"``: pick each query's path point on held-out rows.

    ``fit_mask_T`` is float32 0/1 (1 = fit row, 0 = held out). The path (fractions 1.0 down to
    ``path_min_frac``) is fitted on the fit rows; each query keeps the point with the lowest
    held-out MSE, then the path is rerun on all rows and that point's solution is returned.
    Returns the same dict as :func:`lasso_scores_arrays`.
    """
    fit_mask_T = jnp.asarray(fit_mask_T, jnp.float32)
    held_T = 1.0 - fit_mask_T
    fracs_K = _fracs(path_min_frac, solver.path_len)
    num_examples = subsets_NxD.shape[0]
    zeros_N = jnp.zeros(num_examples, jnp.float32)
    mv_f, centre_f, solve_f = _setup(members_TxS, subsets_NxD, fit_mask_T, *_solver_args(solver))
    _, centre_a, solve_a = _setup(
        members_TxS, subsets_NxD, jnp.ones_like(fit_mask_T), *_solver_args(solver)
    )

    def one_query(y_T):
        yc_T, ybar, lam_max = centre_f(y_T)

        def fit_step(b_N, frac):
            b_N = solve_f(b_N, yc_T, lam_max, frac)
            # mv_f is centred on the fit rows, so mv_f(b) + ybar = A b + (ybar - mu.b).
            err_T = mv_f(b_N) + ybar - y_T
            return b_N, jnp.sum(held_T * err_T * err_T) / jnp.sum(held_T)

        _, mse_K = jax.lax.scan(fit_step, zeros_N, fracs_K)
        best = jnp.argmin(mse_K)

        yc_all_T, _, lam_max_all = centre_a(y_T)

        def refit_step(carry, k_frac):
            b_N, keep_N = carry
            k, frac = k_frac
            b_N = solve_a(b_N, yc_all_T, lam_max_all, frac)
            return (b_N, jnp.where(k == best, b_N, keep_N)), None

        (_, keep_N), _ = jax.lax.scan(
            refit_step, (zeros_N, zeros_N), (jnp.arange(solver.path_len), fracs_K)
        )
        return keep_N, fracs_K[best] * lam_max_all, fracs_K[best]

    return _result(*jax.vmap(one_query)(jnp.asarray(y_QxT, jnp.float32)))


def _design_arrays(design_or_arrays):
    if isinstance(design_or_arrays, Design):
        return design_or_arrays.members_TxS, design_or_arrays.subsets_NxD
    if isinstance(design_or_arrays, dict):
        return design_or_arrays["members_TxS"], design_or_arrays["subsets_NxD"]
    raise ValueError(
        "design_or_arrays must be a subsets.Design or a dict with members_TxS and subsets_NxD"
    )


@jax.jit
def _all_finite(x) -> jax.Array:
    """Whether every entry is finite: one program (op by op, a fresh process compiled three)."""
    return jnp.isfinite(x).all()


def _validate(config: LassoConfig, members_TxS, y_QxT, key) -> None:
    num_subsets = int(members_TxS.shape[0])
    if y_QxT.ndim != 2:
        raise ValueError(f"responses y_QxT must be 2-D (Q, T), got shape {tuple(y_QxT.shape)}")
    if y_QxT.shape[1] != num_subsets:
        raise ValueError(
            f"responses y_QxT have T={y_QxT.shape[1]} columns but the design has "
            f"T={num_subsets} subsets"
        )
    if y_QxT.shape[0] < 1:
        raise ValueError("responses y_QxT have no queries (Q = 0)")
    if not bool(_all_finite(y_QxT)):
        raise ValueError("responses y_QxT contain NaN or inf")
    if config.solver not in _SOLVERS:
        raise ValueError(f"unknown solver {config.solver!r}; choose one of {list(_SOLVERS)}")
    if config.select not in _SELECTS:
        raise ValueError(f"unknown select {config.select!r}; choose one of {list(_SELECTS)}")
    if not config.lam_frac > 0:
        raise ValueError(f"lam_frac must be > 0, got {config.lam_frac}")
    if config.path_len < 1 or config.maxiter < 1:
        raise ValueError(
            f"path_len and maxiter must be >= 1, got {config.path_len}, {config.maxiter}"
        )
    if config.working_set < 0 or config.ws_rounds < 1:
        raise ValueError(
            f"working_set must be >= 0 and ws_rounds >= 1, got {config.working_set}, "
            f"{config.ws_rounds}"
        )
    if config.working_set and (config.solver != "fista" or config.select != "fixed"):
        raise ValueError(
            "working_set > 0 runs FISTA at a fixed lambda: it needs solver='fista' and "
            f"select='fixed', got solver={config.solver!r}, select={config.select!r}"
        )
    if config.select == "heldout":
        if key is None:
            raise ValueError("select='heldout' needs a PRNG key to choose held-out rows")
        if not 0.0 < config.holdout_frac < 1.0:
            raise ValueError(f"holdout_frac must be in (0, 1), got {config.holdout_frac}")
        if not 0.0 < config.path_min_frac <= 1.0:
            raise ValueError(f"path_min_frac must be in (0, 1], got {config.path_min_frac}")


def lasso_scores(design_or_arrays, y_QxT, config: LassoConfig, key=None, mesh=None) -> dict:
    """Per-example scores for each query by (optionally non-negative) Lasso.

    Args:
      design_or_arrays: a :class:`~stride_jax.subsets.Design` (T subsets x N examples) or its
        ``to_arrays()`` dict.
      y_QxT: responses, one row per query, one column per subset.
      config: :class:`LassoConfig`.
      key: PRNG key choosing the held-out rows (only for ``select="heldout"``).
      mesh: optional ``sharding.make_mesh`` mesh: queries are split over its ``data`` axis
        (padded to a multiple of it), the design is replicated.

    Returns:
      ``{"scores_QxN": float32 (Q, N), "lam_Q": chosen lambda (Q,), "lam_frac_Q": lambda /
      lambda_max (Q,), "nnz_Q": active-set sizes (Q,)}``.
    """
    members_TxS, subsets_NxD = _design_arrays(design_or_arrays)
    y_QxT = jnp.asarray(y_QxT, jnp.float32)
    _validate(config, members_TxS, y_QxT, key)
    # Each query's solve holds a few N-vectors (about 128 bytes per example; coordinate
    # descent: residual, responses and scores, and one sweep's gathers, ~3T + (2d+2)N floats,
    # twice over): at most ~1 GB of queries at once (digits: all queries at once).
    (num_examples, degree), num_subsets = np.shape(subsets_NxD), int(members_TxS.shape[0])
    per_query = 128 * num_examples
    if config.working_set:
        per_query = 4 * (10 + degree) * num_examples + 4 * config.working_set**2 * degree
    if config.solver == "cd":
        per_query = 8 * (3 * num_subsets + (2 * degree + 2) * num_examples)
    step = resources.items_at_once(int(y_QxT.shape[0]), per_query)
    if y_QxT.shape[0] > step:
        parts = [
            lasso_scores(design_or_arrays, y_QxT[i : i + step], config, key, mesh)
            for i in range(0, int(y_QxT.shape[0]), step)
        ]
        return {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}
    members_TxS = jnp.asarray(members_TxS, jnp.int32)
    subsets_NxD = jnp.asarray(subsets_NxD, jnp.int32)
    num_queries = int(y_QxT.shape[0])
    if mesh is not None:
        y_QxT, _ = sharding.pad_to_multiple(y_QxT, mesh.shape[sharding.DATA])
        y_QxT = jax.device_put(y_QxT, sharding.along(mesh, sharding.DATA, 2))
        members_TxS, subsets_NxD = jax.device_put(
            (members_TxS, subsets_NxD), sharding.replicated(mesh)
        )
    if config.working_set:
        out = _ws_scores(design_or_arrays, members_TxS, subsets_NxD, y_QxT, config, mesh)
        return {k: v[:num_queries] for k, v in out.items()}
    if config.solver == "cd":
        out = _cd_scores(members_TxS, subsets_NxD, y_QxT, config, key, mesh)
        return {k: v[:num_queries] for k, v in out.items()}
    solver = Solver(*(getattr(config, name) for name in Solver._fields))
    if config.select == "fixed":
        ones_T = jnp.ones(num_subsets, jnp.float32)
        out = lasso_scores_arrays(
            members_TxS, subsets_NxD, y_QxT, ones_T, jnp.float32(config.lam_frac), solver
        )
        return {k: v[:num_queries] for k, v in out.items()}
    fit_mask_T = _fit_mask(config, num_subsets, key)
    min_frac = jnp.float32(config.path_min_frac)
    return lasso_heldout_arrays(members_TxS, subsets_NxD, y_QxT, fit_mask_T, min_frac, solver)


def _fit_mask(config: LassoConfig, num_subsets: int, key) -> np.ndarray:
    """float32 0/1 over the T rows: 0 on ``holdout_frac`` of them, drawn with ``key``."""
    num_held = max(1, round(config.holdout_frac * num_subsets))
    if num_subsets - num_held < 2:
        raise ValueError(
            f"holdout_frac={config.holdout_frac} leaves fewer than 2 of T={num_subsets} rows to fit"
        )
    held = np.asarray(jax.random.permutation(key, num_subsets))[:num_held]
    fit_mask_T = np.ones(num_subsets, np.float32)
    fit_mask_T[held] = 0.0
    return fit_mask_T


def _cd_scores(members_TxS, subsets_NxD, y_QxT, config: LassoConfig, key, mesh) -> dict:
    """``solver="cd"``: :mod:`lasso_cd`'s cores on the same path and held-out rows."""
    num_subsets = int(members_TxS.shape[0])
    blocks_CxB = lasso_cd.cached_blocks(np.asarray(subsets_NxD, np.int32), num_subsets)
    if mesh is not None:
        blocks_CxB = jax.device_put(blocks_CxB, sharding.replicated(mesh))
    settings = lasso_cd.Settings(
        config.nonneg, config.fit_intercept, config.maxiter, config.tol, lasso_cd.query_chunk(mesh)
    )
    args = (members_TxS, subsets_NxD, blocks_CxB, y_QxT)
    if config.select == "fixed":
        fracs_K = _fracs(jnp.float32(config.lam_frac), config.path_len)
        ones_T = jnp.ones(num_subsets, jnp.float32)
        scores_QxN, lam_Q = lasso_cd.scores_arrays(*args, ones_T, fracs_K, settings)
        return _result(scores_QxN, lam_Q, jnp.full(lam_Q.shape, fracs_K[-1]))
    fracs_K = _fracs(jnp.float32(config.path_min_frac), config.path_len)
    fit_mask_T = _fit_mask(config, num_subsets, key)
    return _result(*lasso_cd.heldout_arrays(*args, fit_mask_T, fracs_K, settings))


def _ws_scores(design_or_arrays, members_TxS, subsets_NxD, y_QxT, config, mesh) -> dict:
    """``working_set > 0``: :mod:`lasso_ws`; queries whose gap did not close are re-solved on
    all columns by :mod:`lasso_cd`, which stops at the same duality-gap tolerance (FISTA's fixed
    ``maxiter`` would not: ``maxiter`` here counts steps per restricted solve)."""
    width = min(config.working_set, int(subsets_NxD.shape[0]))
    chunk = lasso_cd.query_chunk(mesh)
    settings = lasso_ws.Settings(
        config.nonneg,
        config.fit_intercept,
        width,
        config.ws_rounds,
        config.maxiter,
        config.tol,
        chunk,
    )
    lam_frac = jnp.float32(config.lam_frac)
    scores_QxN, lam_Q, ok_Q = lasso_ws.scores_arrays(
        members_TxS, subsets_NxD, y_QxT, lam_frac, settings
    )
    redo = np.flatnonzero(~np.asarray(ok_Q))
    if redo.size:
        full = lasso_scores(
            design_or_arrays,
            y_QxT[redo],
            dataclasses.replace(
                config,
                working_set=0,
                solver="cd",
                path_len=1,
                maxiter=config.maxiter * config.ws_rounds,
            ),
        )
        scores_QxN = scores_QxN.at[redo].set(full["scores_QxN"])
    out = _result(scores_QxN, lam_Q, jnp.full(lam_Q.shape, lam_frac))
    out["ws_converged_Q"] = ok_Q
    return out
