"""The Lasso's opt-in coordinate-descent solver (``LassoConfig(solver="cd")``), batched.

It solves :mod:`stride_jax.stride.recover`'s problem (scikit-learn's scaling, implicit
centring, optional b >= 0, 0/1 row weights) like scikit-learn's ``Lasso``, by cyclic
coordinate descent, made parallel by the design's sparsity: each column of A has d ones, so a
coordinate update reads and writes d residual entries. The columns are coloured so that no two
of one colour share a subset (:func:`colour_blocks`); those updates are independent and run as
one vectorised step, a sweep is one step per colour (3 on digits), and a batch of queries runs
together (the residual is ``T x Q``). The rank-one centring term couples a colour's columns;
each step majorises it (curvature ``mu_j`` instead of ``mu_j - mu_j^2``), so the objective never
rises. A query stops when its duality gap is at most ``tol * ||y_c||^2 / T'``, scikit-learn's
rule (in float32 the gap is resolved to about 1e-7 of ``||y_c||^2 / T'``), and is then frozen,
so its result does not depend on the other queries of its batch. Solves are warm-started along
the lambda path that ``recover`` passes in (``fracs_K``).
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_BLOCKS: dict = {}  # (T, shape, digest of subsets_NxD) -> colour blocks, see cached_blocks
_CPU_QUERY_CHUNK = 32  # queries per batch on a CPU (residual in cache: 2x faster on MNIST)


class Settings(NamedTuple):
    """The static (compile-time) settings of the jitted cores (``query_chunk``: queries per
    batch, 0 = all at once; the others as in ``recover.LassoConfig``)."""

    nonneg: bool
    fit_intercept: bool
    maxiter: int
    tol: float
    query_chunk: int = 0


def query_chunk(mesh) -> int:
    """Queries per batch: ``_CPU_QUERY_CHUNK`` on one CPU device; elsewhere all at once (0)."""
    if jax.default_backend() != "cpu" or (mesh is not None and mesh.size > 1):
        return 0
    return _CPU_QUERY_CHUNK


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


def cached_blocks(subsets_NxD: np.ndarray, num_subsets: int) -> np.ndarray:
    """:func:`colour_blocks`, remembered for the last few designs (by content): streamed
    scoring calls ``lasso_scores`` once per batch of queries, and colouring N = 1M takes s."""
    digest = hashlib.blake2b(subsets_NxD.tobytes(), digest_size=16).hexdigest()
    key = (num_subsets, subsets_NxD.shape, digest)
    if key not in _BLOCKS:
        if len(_BLOCKS) >= 4:
            _BLOCKS.pop(next(iter(_BLOCKS)))
        _BLOCKS[key] = colour_blocks(subsets_NxD, num_subsets)
    return _BLOCKS[key]


def _pad(x, value, n=1):
    """``x`` with ``n`` rows of ``value`` appended (the sentinel rows of the gather tables)."""
    return jnp.concatenate([x, jnp.full((n,) + x.shape[1:], value, x.dtype)])


def gather_sum(x_MxQ, idx_KxJ):
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


def _setup(members_TxS, subsets_NxD, blocks_CxB, w_T, settings: Settings) -> _Cd:
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
    muc_N = mu_N if settings.fit_intercept else jnp.zeros_like(mu_N)
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
        rho = gather_sum(u_pad, rows_CxBxD.reshape(num_slots, -1)).reshape(
            blocks_CxB.shape + s_Q.shape
        )
        return (rho - muc_CxB[..., None] * s_Q) / n_used

    def residual(b_CxBxQ, yc_TxQ):
        b_pad = _pad(b_CxBxQ.reshape(num_slots, -1), 0.0)
        u_TxQ = w_T[:, None] * (yc_TxQ - gather_sum(b_pad, members_slots_TxS))
        return _pad(u_TxQ, 0.0), u_TxQ.sum(0)

    def gap(b_CxBxQ, u_pad, s_Q, lam_Q):
        """Duality gap, as a sum of nonnegative terms (no float32 cancellation): with the dual
        point s r, gap = (1 - s)^2 ||r||^2 / (2 T') + sum_j (lam |b_j| - s rho_j b_j)."""
        rho = gradient(u_pad, s_Q)
        r_TxQ = u_pad[:num_subsets] - w_T[:, None] * (s_Q / n_used)
        dual_Q = jnp.max(rho if settings.nonneg else jnp.abs(rho), (0, 1))
        scale_Q = jnp.minimum(1.0, lam_Q / jnp.maximum(dual_Q, 1e-30))
        slack_Q = jnp.sum(lam_Q * jnp.abs(b_CxBxQ) - scale_Q * rho * b_CxBxQ, (0, 1))
        return 0.5 * (1.0 - scale_Q) ** 2 * jnp.sum(r_TxQ * r_TxQ, 0) / n_used + slack_Q

    def sweep(b_CxBxQ, u_pad, s_Q, lam_Q, live_Q):
        """One pass over the colours; queries with ``live_Q == 0`` are left unchanged."""

        def step(carry, colour):
            u_pad, s_Q = carry
            rows_BxD, wts_BxD, muc_B, lip_B, old_BxQ = colour
            rho_BxQ = (gather_sum(u_pad, rows_BxD) - muc_B[:, None] * s_Q) / n_used
            new_BxQ = _soft(
                old_BxQ + rho_BxQ / lip_B[:, None], lam_Q / lip_B[:, None], settings.nonneg
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
        ybar_Q = w_T @ y_TxQ / n_used if settings.fit_intercept else jnp.zeros(y_TxQ.shape[1])
        yc_TxQ = w_T[:, None] * (y_TxQ - ybar_Q)
        rho_NxQ = gather_sum(_pad(yc_TxQ, 0.0), subsets_NxD) / n_used
        lam_max_Q = jnp.max(rho_NxQ if settings.nonneg else jnp.abs(rho_NxQ), 0)
        return yc_TxQ, ybar_Q, jnp.maximum(lam_max_Q, 0.0)

    def solve(b_NxQ, yc_TxQ, lam_Q):
        """Sweeps until each query's gap is within tol (checked, on a freshly computed
        residual, after every sweep) or ``maxiter`` sweeps; a query that has converged is
        frozen, so its result does not depend on the other queries in the batch."""
        stop_Q = settings.tol * jnp.sum(yc_TxQ * yc_TxQ, 0) / n_used

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
            lambda c: jnp.any(c[3] > 0) & (c[4] < settings.maxiter), body, carry
        )
        return carry[0].reshape(num_slots, -1)[slot_N]

    def fitted(b_NxQ, ybar_Q):
        return gather_sum(_pad(b_NxQ, 0.0), members_TxS) - muc_N @ b_NxQ + ybar_Q

    return _Cd(centre, solve, fitted)


def _at(cd: _Cd, b_NxQ, yc_TxQ, lam_max_Q, frac):
    """The Lasso at ``frac * lam_max`` from ``b_NxQ``. By KKT b = 0 when frac >= 1; set it
    exactly, since float32 sums of the gradient in and out of the solver can differ by an ulp."""
    b_NxQ = cd.solve(b_NxQ, yc_TxQ, frac * lam_max_Q)
    return jnp.where(frac >= 1.0, jnp.zeros_like(b_NxQ), b_NxQ)


def chunked(fn, y_QxT, chunk: int):
    """``fn`` (queries -> per-query arrays) on ``chunk`` queries at a time under ``lax.map``
    (0: all at once). On a CPU a chunk whose residual stays in cache sweeps 2-3x faster per
    query than one big batch; padding queries (y = 0) converge at once."""
    num_queries = y_QxT.shape[0]
    if chunk == 0 or chunk >= num_queries:
        return fn(y_QxT)
    y_KxCxT = _pad(y_QxT, 0.0, -num_queries % chunk).reshape(-1, chunk, y_QxT.shape[1])
    outs = jax.lax.map(fn, y_KxCxT)
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num_queries], outs)


@partial(jax.jit, static_argnames="settings")
def scores_arrays(members_TxS, subsets_NxD, blocks_CxB, y_QxT, w_T, fracs_K, settings: Settings):
    """Lasso at ``fracs_K[-1] * lambda_max`` per query, warm-started along ``fracs_K``.

    Args: ``members_TxS`` / ``subsets_NxD`` int32 design tables, ``blocks_CxB`` their columns'
    colouring (:func:`colour_blocks`; one column per block is plain cyclic coordinate
    descent), ``y_QxT`` float32 responses, ``w_T`` 0/1 row weights, ``fracs_K`` the path.
    Returns ``(scores_QxN, lam_Q)``.
    """
    cd = _setup(members_TxS, subsets_NxD, jnp.asarray(blocks_CxB), w_T, settings)

    def one_chunk(y_QxT):
        yc_TxQ, _, lam_max_Q = cd.centre(y_QxT.T)

        def step(b_NxQ, frac):
            return _at(cd, b_NxQ, yc_TxQ, lam_max_Q, frac), None

        b_NxQ, _ = jax.lax.scan(step, jnp.zeros((subsets_NxD.shape[0], y_QxT.shape[0])), fracs_K)
        return b_NxQ.T, fracs_K[-1] * lam_max_Q

    return chunked(one_chunk, jnp.asarray(y_QxT, jnp.float32), settings.query_chunk)


@partial(jax.jit, static_argnames="settings")
def heldout_arrays(
    members_TxS, subsets_NxD, blocks_CxB, y_QxT, fit_mask_T, fracs_K, settings: Settings
):
    """``select="heldout"``: each query keeps the point of the path ``fracs_K`` (fitted on the
    rows where ``fit_mask_T`` is 1) with the lowest MSE on the other rows; the path is rerun on
    all rows and that point's solution returned. Returns ``(scores_QxN, lam_Q, lam_frac_Q)``.
    """
    blocks_CxB = jnp.asarray(blocks_CxB)
    fit_mask_T = jnp.asarray(fit_mask_T, jnp.float32)
    held_T = 1.0 - fit_mask_T
    fit = _setup(members_TxS, subsets_NxD, blocks_CxB, fit_mask_T, settings)
    full = _setup(members_TxS, subsets_NxD, blocks_CxB, jnp.ones_like(fit_mask_T), settings)

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

        steps = (jnp.arange(fracs_K.shape[0]), fracs_K)
        (_, keep_NxQ), _ = jax.lax.scan(refit_step, (zeros_NxQ, zeros_NxQ), steps)
        return keep_NxQ.T, fracs_K[best_Q] * lam_max_all_Q, fracs_K[best_Q]

    return chunked(one_chunk, jnp.asarray(y_QxT, jnp.float32), settings.query_chunk)
