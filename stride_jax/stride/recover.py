"""Stage 2b: recover per-example scores from per-subset responses by a batched Lasso.

For each query q, with responses ``y_T`` (one per subset) and the design ``A_TxN``, solve

    min_b  1/(2 T') sum_t w_t ((A_c b)_t - (y_c)_t)^2 + lam ||b||_1      (optionally b >= 0)

in scikit-learn's scaling (``T' = sum_t w_t``, the rows actually used; ``w`` masks held-out
rows). With ``fit_intercept`` the columns of A and y are centred implicitly on the used rows
(``A_c = A - 1 mu^T``), exactly like ``sklearn.linear_model.Lasso``.

The solver is coordinate descent, like scikit-learn's, made parallel by the design's sparsity:
each column of A has d ones, so a coordinate update reads and writes d residual entries. The
columns are coloured so that no two of one colour share a subset (``colour_blocks``); those
updates are independent and run as one vectorised step, a sweep is one step per colour (3 on
digits), and all queries run together (the residual is ``T x Q``). The rank-one centring term
couples a colour's columns; each step majorises it (curvature ``mu_j`` instead of
``mu_j - mu_j^2``), so the objective never rises. A query stops when its duality gap is at most
``tol * ||y_c||^2 / T'``, scikit-learn's rule, so ``tol`` means what it means there. Solves
are warm-started along a geometric lambda path.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax import resources, sharding
from stride_jax.stride.subsets import Design

_SELECTS = ("fixed", "heldout")
_BLOCKS: dict = {}  # (T, shape, digest of subsets_NxD) -> colour blocks, see _cached_blocks
_CPU_QUERY_CHUNK = 32  # queries per batch on a CPU (residual in cache: 2x faster on MNIST)


@dataclasses.dataclass(frozen=True)
class LassoConfig:
    """Lasso settings; lambda is always a fraction of each query's lambda_max."""

    lam_frac: float = 0.05  # lambda = lam_frac * lambda_max (per query)
    nonneg: bool = False
    fit_intercept: bool = True
    maxiter: int = 500  # at most this many coordinate-descent sweeps per path point
    tol: float = 1e-6  # stop a query at duality gap <= tol * ||y_c||^2 / T' (sklearn's rule)
    path_len: int = 8  # warm-started path from lambda_max down to lam_frac*lambda_max (geometric)
    select: str = "fixed"  # "fixed": use lam_frac; "heldout": choose per query on held-out rows
    holdout_frac: float = 0.1
    path_min_frac: float = 0.005  # smallest fraction considered when select == "heldout"


def colour_blocks(subsets_NxD, num_subsets: int) -> np.ndarray:
    """Columns grouped so that no two in a group share a subset: int32 ``(C, B)``, padded with N.

    Greedy first-fit colouring on the host (per column, one OR over its subsets' bit masks of
    the colours used there). The expander design needs about max subset size colours.
    """
    subsets_NxD = np.asarray(subsets_NxD)
    num_examples = subsets_NxD.shape[0]
    used = [0] * (num_subsets + 1)  # bit c set: colour c already has a column in that subset
    colour_N = np.empty(num_examples, np.int64)
    for j, rows in enumerate(subsets_NxD.tolist()):
        rows = [r for r in rows if r < num_subsets]
        taken = 0
        for r in rows:
            taken |= used[r]
        colour = (~taken & (taken + 1)).bit_length() - 1  # lowest free colour
        for r in rows:
            used[r] |= 1 << colour
        colour_N[j] = colour
    order = np.argsort(colour_N, kind="stable")
    counts = np.bincount(colour_N, minlength=1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    blocks_CxB = np.full((counts.size, max(int(counts.max(initial=0)), 1)), num_examples, np.int32)
    blocks_CxB[colour_N[order], np.arange(num_examples) - starts[colour_N[order]]] = order
    return blocks_CxB


def _cached_blocks(subsets_NxD: np.ndarray, num_subsets: int) -> np.ndarray:
    """:func:`colour_blocks`, remembered for the last few designs (by content): streamed
    scoring calls ``lasso_scores`` once per batch of queries, and colouring N = 1M takes s."""
    digest = hashlib.blake2b(subsets_NxD.tobytes(), digest_size=16).hexdigest()
    key = (num_subsets, subsets_NxD.shape, digest)
    if key not in _BLOCKS:
        if len(_BLOCKS) >= 4:
            _BLOCKS.pop(next(iter(_BLOCKS)))
        _BLOCKS[key] = colour_blocks(subsets_NxD, num_subsets)
    return _BLOCKS[key]


def _fracs(end_frac, path_len: int):
    """Geometric fractions 1.0 -> end_frac (path_len points; just end_frac when path_len == 1)."""
    if path_len == 1:
        return jnp.reshape(jnp.asarray(end_frac, jnp.float32), (1,))
    return jnp.asarray(end_frac, jnp.float32) ** (jnp.arange(path_len) / (path_len - 1.0))


def _pad(x, value, n=1):
    """``x`` with ``n`` rows of ``value`` appended (the sentinel rows of the gather tables)."""
    return jnp.concatenate([x, jnp.full((n,) + x.shape[1:], value, x.dtype)])


def _gather_sum(x_MxQ, idx_KxJ):
    """``x[idx].sum(1)``, one gather per column of ``idx``: XLA's CPU gather copies whole rows
    fast but is ~10x slower when it gathers a K x J table of rows and reduces it."""

    def take(k):
        return x_MxQ.at[idx_KxJ[:, k]].get(mode="promise_in_bounds")

    if idx_KxJ.shape[1] <= 16:
        return sum(take(k) for k in range(idx_KxJ.shape[1]))
    return jax.lax.fori_loop(1, idx_KxJ.shape[1], lambda k, acc: acc + take(k), take(0))


def _soft(z, thr, nonneg: bool):
    if nonneg:
        return jnp.maximum(z - thr, 0.0)
    return jnp.sign(z) * jnp.maximum(jnp.abs(z) - thr, 0.0)


class _Cd(NamedTuple):
    """One row weighting's coordinate-descent problem, shared by all queries (see ``_setup``)."""

    centre: object  # y_TxQ -> (yc_TxQ, ybar_Q, lam_max_Q)
    solve: object  # (b_NxQ, yc_TxQ, lam_Q) -> b_NxQ at those lambdas, warm-started from b_NxQ
    fitted: object  # (b_NxQ, ybar_Q) -> fitted responses on every row, T x Q


def _setup(members_TxS, subsets_NxD, blocks_CxB, w_T, solver) -> _Cd:
    """Centring, duality gap and batched coordinate descent for one 0/1 row weighting ``w_T``.

    Internally the residual is kept as ``u = w * (y_c - A b)`` (``T+1 x Q``, last row the zero
    sentinel) and ``s = sum_t u_t``; the true residual is ``u + w * (-s / T')``, so centring
    costs one scalar per query instead of a dense column update. Inside a solve the scores are
    held colour by colour (``C x B x Q``, padding slots stay 0), so a sweep scatters only into u.
    """
    num_subsets, num_examples = members_TxS.shape[0], subsets_NxD.shape[0]
    num_slots = blocks_CxB.size
    w_T = jnp.asarray(w_T, jnp.float32)
    n_used = jnp.sum(w_T)
    w_pad = _pad(w_T, 0.0)
    mu_N = w_pad[subsets_NxD].sum(-1) / n_used  # column means on the used rows = curvatures
    muc_N = mu_N if solver.fit_intercept else jnp.zeros_like(mu_N)
    rows_CxBxD = _pad(subsets_NxD, num_subsets)[blocks_CxB]
    muc_CxB = _pad(muc_N, 0.0)[blocks_CxB]
    per_colour = (
        rows_CxBxD,
        w_pad[rows_CxBxD],
        muc_CxB,
        _pad(jnp.maximum(mu_N, 1e-30), 1.0)[blocks_CxB],  # padding slots: gradient 0, b 0
    )
    slot_N = (
        jnp.zeros(num_examples + 1, jnp.int32)
        .at[blocks_CxB.reshape(-1)]
        .set(jnp.arange(num_slots, dtype=jnp.int32))[:num_examples]
    )
    members_slots_TxS = _pad(slot_N, num_slots)[members_TxS]  # sentinel -> the zero slot

    def gradient(u_pad, s_Q):  # rho = A_c^T W r / T' for every slot, C x B x Q
        rho = _gather_sum(u_pad, rows_CxBxD.reshape(num_slots, -1)).reshape(
            blocks_CxB.shape + s_Q.shape
        )
        return (rho - muc_CxB[..., None] * s_Q) / n_used

    def residual(b_CxBxQ, yc_TxQ):
        b_pad = _pad(b_CxBxQ.reshape(num_slots, -1), 0.0)
        u_TxQ = w_T[:, None] * (yc_TxQ - _gather_sum(b_pad, members_slots_TxS))
        return _pad(u_TxQ, 0.0), u_TxQ.sum(0)

    def gap(b_CxBxQ, u_pad, s_Q, lam_Q):
        """Duality gap, as a sum of nonnegative terms (no float32 cancellation): with the dual
        point s r, gap = (1 - s)^2 ||r||^2 / (2 T') + sum_j (lam |b_j| - s rho_j b_j)."""
        rho = gradient(u_pad, s_Q)
        r_TxQ = u_pad[:num_subsets] - w_T[:, None] * (s_Q / n_used)
        dual_Q = jnp.max(rho if solver.nonneg else jnp.abs(rho), (0, 1))
        scale_Q = jnp.minimum(1.0, lam_Q / jnp.maximum(dual_Q, 1e-30))
        slack_Q = jnp.sum(lam_Q * jnp.abs(b_CxBxQ) - scale_Q * rho * b_CxBxQ, (0, 1))
        return 0.5 * (1.0 - scale_Q) ** 2 * jnp.sum(r_TxQ * r_TxQ, 0) / n_used + slack_Q

    def sweep(b_CxBxQ, u_pad, s_Q, lam_Q, live_Q):
        """One pass over the colours; queries with ``live_Q == 0`` are left unchanged."""

        def step(carry, colour):
            u_pad, s_Q = carry
            rows_BxD, wts_BxD, muc_B, lip_B, old_BxQ = colour
            rho_BxQ = (_gather_sum(u_pad, rows_BxD) - muc_B[:, None] * s_Q) / n_used
            new_BxQ = _soft(
                old_BxQ + rho_BxQ / lip_B[:, None], lam_Q / lip_B[:, None], solver.nonneg
            )
            delta_BxQ = (new_BxQ - old_BxQ) * live_Q
            for k in range(rows_BxD.shape[1]):  # rows of one colour are distinct: no collisions
                u_pad = u_pad.at[rows_BxD[:, k]].add(
                    -wts_BxD[:, k, None] * delta_BxQ, mode="promise_in_bounds"
                )
            s_Q = s_Q - n_used * jnp.sum(muc_B[:, None] * delta_BxQ, 0)
            return (u_pad, s_Q), old_BxQ + delta_BxQ

        (u_pad, s_Q), b_CxBxQ = jax.lax.scan(step, (u_pad, s_Q), per_colour + (b_CxBxQ,))
        return b_CxBxQ, u_pad, s_Q

    def centre(y_TxQ):
        ybar_Q = w_T @ y_TxQ / n_used if solver.fit_intercept else jnp.zeros(y_TxQ.shape[1])
        yc_TxQ = w_T[:, None] * (y_TxQ - ybar_Q)
        rho_NxQ = _gather_sum(_pad(yc_TxQ, 0.0), subsets_NxD) / n_used
        lam_max_Q = jnp.max(rho_NxQ if solver.nonneg else jnp.abs(rho_NxQ), 0)
        return yc_TxQ, ybar_Q, jnp.maximum(lam_max_Q, 0.0)

    def solve(b_NxQ, yc_TxQ, lam_Q):
        """Sweeps until each query's gap is within tol (checked, on a freshly computed
        residual, after every sweep) or ``maxiter`` sweeps; a query that has converged is
        frozen, so its result does not depend on the other queries in the batch."""
        stop_Q = solver.tol * jnp.sum(yc_TxQ * yc_TxQ, 0) / n_used

        def live(b_CxBxQ):
            u_pad, s_Q = residual(b_CxBxQ, yc_TxQ)
            return u_pad, s_Q, (gap(b_CxBxQ, u_pad, s_Q, lam_Q) > stop_Q).astype(jnp.float32)

        def body(carry):
            b_CxBxQ, u_pad, s_Q, live_Q, it = carry
            b_CxBxQ, _, _ = sweep(b_CxBxQ, u_pad, s_Q, lam_Q, live_Q)
            u_pad, s_Q, now_Q = live(b_CxBxQ)
            return b_CxBxQ, u_pad, s_Q, live_Q * now_Q, it + 1

        b_CxBxQ = _pad(b_NxQ, 0.0)[blocks_CxB]
        carry = (b_CxBxQ, *live(b_CxBxQ), 0)
        carry = jax.lax.while_loop(
            lambda c: jnp.any(c[3] > 0) & (c[4] < solver.maxiter), body, carry
        )
        return carry[0].reshape(num_slots, -1)[slot_N]

    def fitted(b_NxQ, ybar_Q):
        return _gather_sum(_pad(b_NxQ, 0.0), members_TxS) - muc_N @ b_NxQ + ybar_Q

    return _Cd(centre, solve, fitted)


def _at(cd: _Cd, b_NxQ, yc_TxQ, lam_max_Q, frac):
    """The Lasso at ``frac * lam_max`` from ``b_NxQ``. By KKT b = 0 when frac >= 1; set it
    exactly, since float32 sums of the gradient in and out of the solver can differ by an ulp."""
    b_NxQ = cd.solve(b_NxQ, yc_TxQ, frac * lam_max_Q)
    return jnp.where(frac >= 1.0, jnp.zeros_like(b_NxQ), b_NxQ)


def _result(scores_QxN, lam_Q, lam_frac_Q) -> dict:
    nnz_Q = jnp.sum(scores_QxN != 0, -1)
    return {"scores_QxN": scores_QxN, "lam_Q": lam_Q, "lam_frac_Q": lam_frac_Q, "nnz_Q": nnz_Q}


def _blocks(blocks_CxB, subsets_NxD):
    """The given colour blocks, or one column per block (plain cyclic coordinate descent)."""
    if blocks_CxB is None:
        return jnp.arange(subsets_NxD.shape[0], dtype=jnp.int32)[:, None]
    return jnp.asarray(blocks_CxB, jnp.int32)


def _chunked(fn, y_QxT, chunk: int):
    """``fn`` (queries -> per-query arrays) on ``chunk`` queries at a time under ``lax.map``
    (0: all at once). On a CPU a chunk whose residual stays in cache sweeps 2-3x faster per
    query than one big batch; padding queries (y = 0) converge at once."""
    num_queries = y_QxT.shape[0]
    if chunk == 0 or chunk >= num_queries:
        return fn(y_QxT)
    y_KxCxT = _pad(y_QxT, 0.0, -num_queries % chunk).reshape(-1, chunk, y_QxT.shape[1])
    outs = jax.lax.map(fn, y_KxCxT)
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num_queries], outs)


class Solver(NamedTuple):
    """The static (compile-time) settings of the jitted Lasso cores (``query_chunk``: queries
    per coordinate-descent batch, 0 = all; the others as in :class:`LassoConfig`)."""

    nonneg: bool
    fit_intercept: bool
    maxiter: int
    tol: float
    path_len: int
    query_chunk: int = 0


@partial(jax.jit, static_argnames="solver")
def lasso_scores_arrays(
    members_TxS,
    subsets_NxD,
    y_QxT,
    row_weight_T,
    lam_frac,
    solver: Solver,
    blocks_CxB=None,
) -> dict:
    """Jitted core: Lasso at ``lam_frac * lambda_max`` per query, warm-started along a path.

    Args: ``members_TxS`` / ``subsets_NxD`` int32 design tables, ``y_QxT`` float32 responses,
    ``row_weight_T`` float32 row weights (1 = used, 0 = masked out), ``lam_frac`` scalar,
    ``blocks_CxB`` the columns' colouring (:func:`colour_blocks`; None: one column per block,
    the same result, slower).
    Returns ``{"scores_QxN", "lam_Q", "lam_frac_Q", "nnz_Q"}``.
    """
    blocks_CxB = _blocks(blocks_CxB, subsets_NxD)
    cd = _setup(members_TxS, subsets_NxD, blocks_CxB, row_weight_T, solver)
    fracs_K = _fracs(lam_frac, solver.path_len)

    def one_chunk(y_QxT):
        yc_TxQ, _, lam_max_Q = cd.centre(y_QxT.T)

        def step(b_NxQ, frac):
            return _at(cd, b_NxQ, yc_TxQ, lam_max_Q, frac), None

        b_NxQ, _ = jax.lax.scan(step, jnp.zeros((subsets_NxD.shape[0], y_QxT.shape[0])), fracs_K)
        return b_NxQ.T, fracs_K[-1] * lam_max_Q

    y_QxT = jnp.asarray(y_QxT, jnp.float32)
    scores_QxN, lam_Q = _chunked(one_chunk, y_QxT, solver.query_chunk)
    return _result(scores_QxN, lam_Q, jnp.full(lam_Q.shape, fracs_K[-1]))


@partial(jax.jit, static_argnames="solver")
def lasso_heldout_arrays(
    members_TxS,
    subsets_NxD,
    y_QxT,
    fit_mask_T,
    path_min_frac,
    solver: Solver,
    blocks_CxB=None,
) -> dict:
    """Jitted core for ``select="heldout"``: pick each query's path point on held-out rows.

    ``fit_mask_T`` is float32 0/1 (1 = fit row, 0 = held out). The path (fractions 1.0 down to
    ``path_min_frac``) is fitted on the fit rows; each query keeps the point with the lowest
    held-out MSE, then the path is rerun on all rows and that point's solution is returned.
    Returns the same dict as :func:`lasso_scores_arrays`.
    """
    blocks_CxB = _blocks(blocks_CxB, subsets_NxD)
    fit_mask_T = jnp.asarray(fit_mask_T, jnp.float32)
    held_T = 1.0 - fit_mask_T
    fracs_K = _fracs(path_min_frac, solver.path_len)
    fit = _setup(members_TxS, subsets_NxD, blocks_CxB, fit_mask_T, solver)
    full = _setup(members_TxS, subsets_NxD, blocks_CxB, jnp.ones_like(fit_mask_T), solver)

    def one_chunk(y_QxT):
        y_TxQ = y_QxT.T
        zeros_NxQ = jnp.zeros((subsets_NxD.shape[0], y_TxQ.shape[1]))
        yc_TxQ, ybar_Q, lam_max_Q = fit.centre(y_TxQ)

        def fit_step(b_NxQ, frac):
            b_NxQ = _at(fit, b_NxQ, yc_TxQ, lam_max_Q, frac)
            err_TxQ = fit.fitted(b_NxQ, ybar_Q) - y_TxQ
            return b_NxQ, held_T @ (err_TxQ * err_TxQ) / jnp.sum(held_T)

        _, mse_KxQ = jax.lax.scan(fit_step, zeros_NxQ, fracs_K)
        best_Q = jnp.argmin(mse_KxQ, 0)
        yc_all_TxQ, _, lam_max_all_Q = full.centre(y_TxQ)

        def refit_step(carry, k_frac):
            b_NxQ, keep_NxQ = carry
            k, frac = k_frac
            b_NxQ = _at(full, b_NxQ, yc_all_TxQ, lam_max_all_Q, frac)
            return (b_NxQ, jnp.where(k == best_Q, b_NxQ, keep_NxQ)), None

        steps = (jnp.arange(solver.path_len), fracs_K)
        (_, keep_NxQ), _ = jax.lax.scan(refit_step, (zeros_NxQ, zeros_NxQ), steps)
        return keep_NxQ.T, fracs_K[best_Q] * lam_max_all_Q, fracs_K[best_Q]

    y_QxT = jnp.asarray(y_QxT, jnp.float32)
    return _result(*_chunked(one_chunk, y_QxT, solver.query_chunk))


def _design_arrays(design_or_arrays):
    if isinstance(design_or_arrays, Design):
        return design_or_arrays.members_TxS, design_or_arrays.subsets_NxD
    if isinstance(design_or_arrays, dict):
        return design_or_arrays["members_TxS"], design_or_arrays["subsets_NxD"]
    raise ValueError(
        "design_or_arrays must be a subsets.Design or a dict with members_TxS and subsets_NxD"
    )


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
    if not bool(jnp.all(jnp.isfinite(y_QxT))):
        raise ValueError("responses y_QxT contain NaN or inf")
    if config.select not in _SELECTS:
        raise ValueError(f"unknown select {config.select!r}; choose one of {list(_SELECTS)}")
    if not config.lam_frac > 0:
        raise ValueError(f"lam_frac must be > 0, got {config.lam_frac}")
    if config.path_len < 1 or config.maxiter < 1:
        raise ValueError(
            f"path_len and maxiter must be >= 1, got {config.path_len}, {config.maxiter}"
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
    num_subsets, (num_examples, degree) = int(members_TxS.shape[0]), np.shape(subsets_NxD)
    blocks_CxB = _cached_blocks(np.asarray(subsets_NxD, np.int32), num_subsets)
    # A query's solve holds the residual, responses and scores and the gathers of one sweep
    # (~3T + (2d+2)N floats, twice over for temporaries); at most ~1 GB of queries at once.
    per_query = 8 * (3 * num_subsets + (2 * degree + 2) * num_examples)
    step = resources.items_at_once(int(y_QxT.shape[0]), per_query)
    parts = [
        _lasso(members_TxS, subsets_NxD, blocks_CxB, y_QxT[i : i + step], config, key, mesh)
        for i in range(0, int(y_QxT.shape[0]), step)
    ]
    return {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}


def _query_chunk(mesh) -> int:
    """Queries per batch: ``_CPU_QUERY_CHUNK`` on one CPU device; elsewhere all at once (0)."""
    if jax.default_backend() != "cpu" or (mesh is not None and mesh.size > 1):
        return 0
    return _CPU_QUERY_CHUNK


def _lasso(members_TxS, subsets_NxD, blocks_CxB, y_QxT, config: LassoConfig, key, mesh):
    """:func:`lasso_scores` on one chunk of queries."""
    members_TxS = jnp.asarray(members_TxS, jnp.int32)
    subsets_NxD = jnp.asarray(subsets_NxD, jnp.int32)
    num_queries = int(y_QxT.shape[0])
    if mesh is not None:
        y_QxT, _ = sharding.pad_to_multiple(y_QxT, mesh.shape[sharding.DATA])
        y_QxT = jax.device_put(y_QxT, sharding.along(mesh, sharding.DATA, 2))
        members_TxS, subsets_NxD, blocks_CxB = jax.device_put(
            (members_TxS, subsets_NxD, blocks_CxB), sharding.replicated(mesh)
        )
    settings = (getattr(config, name) for name in Solver._fields[:-1])
    solver = Solver(*settings, query_chunk=_query_chunk(mesh))
    num_subsets = int(members_TxS.shape[0])
    if config.select == "fixed":
        ones_T = jnp.ones(num_subsets, jnp.float32)
        lam_frac = jnp.float32(config.lam_frac)
        args = (members_TxS, subsets_NxD, y_QxT, ones_T, lam_frac, solver, blocks_CxB)
        out = lasso_scores_arrays(*args)
        return {k: v[:num_queries] for k, v in out.items()}
    num_held = max(1, round(config.holdout_frac * num_subsets))
    if num_subsets - num_held < 2:
        raise ValueError(
            f"holdout_frac={config.holdout_frac} leaves fewer than 2 of T={num_subsets} rows to fit"
        )
    held = np.asarray(jax.random.permutation(key, num_subsets))[:num_held]
    fit_mask_T = np.ones(num_subsets, np.float32)
    fit_mask_T[held] = 0.0
    min_frac = jnp.float32(config.path_min_frac)
    args = (members_TxS, subsets_NxD, y_QxT, fit_mask_T, min_frac, solver, blocks_CxB)
    out = lasso_heldout_arrays(*args)
    return {k: v[:num_queries] for k, v in out.items()}
