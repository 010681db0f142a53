"""The Lasso's working-set mode (``LassoConfig(working_set=W)``): jaxopt FISTA on W columns.

At the paper's scale (N = 1M examples, T << N subsets) a query's Lasso solution has few
nonzeros, and every step of the full proximal-gradient solver still touches all N columns.
Here each query alternates, for at most ``rounds`` rounds:

1. **Check** the full problem: residual ``r``, correlations ``rho = A_c^T W r / T'`` (one
   gather-sum over ``subsets_NxD``: the only O(N d) work) and the duality gap; the query stops
   when ``gap <= tol * ||y_c||^2 / T'`` (scikit-learn's rule, as ``solver="cd"``) and is then
   frozen, so its result does not depend on the other queries of its batch.
2. **Choose** W columns: the current nonzeros first, then the largest KKT violations
   ``|rho_j| - lam`` (``rho_j - lam`` with ``nonneg``) of the zero columns.
3. **Solve** the Lasso restricted to them with jaxopt's ``ProximalGradient`` (FISTA, fixed step
   1/L, ``maxiter`` steps), on their W x W Gram matrix ``A_c^T W A_c / T'``: each entry counts
   the used subsets two columns share (d x d comparisons), so no dense column is ever formed.

When the gap closes, the restricted solution is the full problem's (same objective as
:mod:`stride_jax.stride.recover`: scikit-learn's scaling, implicit centring, optional b >= 0).
``converged_Q`` says which queries got there; ``recover.lasso_scores`` re-solves the others
(support larger than W, or too few rounds) on all columns by coordinate descent at the same
tolerance. Solves go straight to the
final lambda (no path): with the working set warm, a path buys nothing.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from stride_jax.stride import lasso_cd
from stride_jax.stride.lasso_cd import gather_sum

with warnings.catch_warnings():  # as in recover.py: jaxopt's unmaintained notice, once
    warnings.filterwarnings(
        "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
    )
    import jaxopt


class Settings(NamedTuple):
    """Static settings: ``width`` W (columns per restricted solve), ``rounds`` (check + solve
    rounds per query at most), ``maxiter`` (FISTA steps per restricted solve), ``tol`` (the gap
    rule), ``query_chunk`` (queries per batch; 0 = all at once)."""

    nonneg: bool
    fit_intercept: bool
    width: int
    rounds: int
    maxiter: int
    tol: float
    query_chunk: int = 0


def _pad(x, value):
    return jnp.concatenate([x, jnp.full((1,) + x.shape[1:], value, x.dtype)])


def gram(sub_WxD, mu_W, w_pad, n_used, fit_intercept: bool):
    """``A_c^T W A_c / T'`` on the columns whose subsets are ``sub_WxD`` (sentinel T: none)."""
    used_WxD = w_pad[sub_WxD]
    count_WxW = jnp.zeros((sub_WxD.shape[0],) * 2, jnp.float32)
    for k in range(sub_WxD.shape[1]):  # d static comparisons of W x W x d
        same_WxWxD = sub_WxD[:, k, None, None] == sub_WxD[None, :, :]
        count_WxW = count_WxW + used_WxD[:, k, None] * jnp.sum(same_WxWxD, -1)
    if fit_intercept:
        count_WxW = count_WxW - n_used * jnp.outer(mu_W, mu_W)
    return count_WxW / n_used


def _restricted(gram_WxW, c_W, b_W, lam, settings: Settings):
    """FISTA on ``1/2 b^T G b - c^T b + lam ||b||_1`` from ``b_W`` (jaxopt, fixed step,
    exactly ``maxiter`` steps: jaxopt's own stopping rule ended the restricted solves early
    enough to cost extra rounds, each of which costs a full check)."""
    step = 1.0 / jnp.maximum(jnp.linalg.eigvalsh(gram_WxW)[-1] * 1.01, 1e-12)

    def value_and_grad(b, _):
        g = gram_WxW @ b - c_W
        return 0.5 * jnp.dot(b, g - c_W), g

    solver = jaxopt.ProximalGradient(
        fun=value_and_grad,
        value_and_grad=True,
        prox=jaxopt.prox.prox_non_negative_lasso if settings.nonneg else jaxopt.prox.prox_lasso,
        stepsize=lambda _: step,
        maxiter=settings.maxiter,
        tol=0.0,
        acceleration=True,
        implicit_diff=False,
    )
    return solver.run(b_W, lam, None).params


def _chunk_scores(y_QxT, members_TxS, subsets_NxD, lam_frac, settings: Settings):
    """One batch of queries: ``(scores_QxN, lam_Q, converged_Q)``."""
    num_subsets, num_examples = members_TxS.shape[0], subsets_NxD.shape[0]
    num_q, width = y_QxT.shape[0], settings.width
    w_pad = _pad(jnp.ones(num_subsets, jnp.float32), 0.0)
    n_used = jnp.float32(num_subsets)
    mu_N = w_pad[subsets_NxD].sum(-1) / n_used
    if not settings.fit_intercept:
        mu_N = jnp.zeros_like(mu_N)
    mu_pad, sub_pad = _pad(mu_N, 0.0), _pad(subsets_NxD, num_subsets)
    y_TxQ = y_QxT.T
    ybar_Q = y_TxQ.mean(0) if settings.fit_intercept else jnp.zeros(num_q)
    yc_TxQ = y_TxQ - ybar_Q
    rho0_NxQ = gather_sum(_pad(yc_TxQ, 0.0), subsets_NxD) / n_used  # sum(yc) = 0 when centred
    lam_Q = lam_frac * jnp.maximum(
        jnp.max(rho0_NxQ if settings.nonneg else jnp.abs(rho0_NxQ), 0), 0
    )
    stop_Q = settings.tol * jnp.sum(yc_TxQ * yc_TxQ, 0) / n_used
    cols_Q = jnp.arange(num_q)

    def dense(ws_QxW, b_QxW):  # N+1 x Q, the sentinel row N collects the empty slots
        return jnp.zeros((num_examples + 1, num_q)).at[ws_QxW, cols_Q[:, None]].set(b_QxW)

    def check(ws_QxW, b_QxW):
        """(rho_NxQ, b_NxQ, gap_Q) of the full problem at the current solution."""
        rows_QxWxD = sub_pad[ws_QxW]
        ab_TxQ = (
            jnp.zeros((num_subsets + 1, num_q))
            .at[rows_QxWxD, cols_Q[:, None, None]]
            .add(jnp.broadcast_to(b_QxW[..., None], rows_QxWxD.shape))[:num_subsets]
        )
        r_TxQ = yc_TxQ - ab_TxQ + jnp.sum(mu_pad[ws_QxW] * b_QxW, -1)
        rho_NxQ = (
            gather_sum(_pad(r_TxQ, 0.0), subsets_NxD) - mu_N[:, None] * r_TxQ.sum(0)
        ) / n_used
        dual_Q = jnp.max(rho_NxQ if settings.nonneg else jnp.abs(rho_NxQ), 0)
        scale_Q = jnp.minimum(1.0, lam_Q / jnp.maximum(dual_Q, 1e-30))
        rho_ws_QxW = _pad(rho_NxQ, 0.0)[ws_QxW, cols_Q[:, None]]
        slack_Q = jnp.sum(
            lam_Q[:, None] * jnp.abs(b_QxW) - scale_Q[:, None] * rho_ws_QxW * b_QxW, -1
        )
        gap_Q = 0.5 * (1.0 - scale_Q) ** 2 * jnp.sum(r_TxQ * r_TxQ, 0) / n_used + slack_Q
        return rho_NxQ, dense(ws_QxW, b_QxW)[:num_examples], gap_Q

    def choose(rho_NxQ, b_NxQ):
        """W columns per query: nonzeros first, then the largest KKT violations (N = empty)."""
        viol_NxQ = (rho_NxQ if settings.nonneg else jnp.abs(rho_NxQ)) - lam_Q
        prio_NxQ = jnp.where(b_NxQ != 0, jnp.inf, jnp.where(viol_NxQ > 0, viol_NxQ, -1.0))
        prio_QxW, ws_QxW = jax.lax.top_k(prio_NxQ.T, width)
        ws_QxW = jnp.where(prio_QxW > 0, ws_QxW, num_examples)
        return ws_QxW, _pad(b_NxQ, 0.0)[ws_QxW, cols_Q[:, None]]

    def solve(ws_W, b_W, lam, rho0_W):
        gram_WxW = gram(sub_pad[ws_W], mu_pad[ws_W], w_pad, n_used, settings.fit_intercept)
        return _restricted(gram_WxW, rho0_W, b_W, lam, settings)

    def choose_and_solve(rho_NxQ, b_NxQ):
        ws_QxW, b_QxW = choose(rho_NxQ, b_NxQ)
        rho0_QxW = _pad(rho0_NxQ, 0.0)[ws_QxW, cols_Q[:, None]]
        return ws_QxW, jax.vmap(solve)(ws_QxW, b_QxW, lam_Q, rho0_QxW)

    def body(carry):
        ws_QxW, b_QxW, live_Q, it = carry
        rho_NxQ, b_NxQ, gap_Q = check(ws_QxW, b_QxW)
        live_Q = live_Q & (gap_Q > stop_Q)
        new_ws_QxW, new_b_QxW = choose_and_solve(rho_NxQ, b_NxQ)
        keep = live_Q[:, None]
        return (
            jnp.where(keep, new_ws_QxW, ws_QxW),
            jnp.where(keep, new_b_QxW, b_QxW),
            live_Q,
            it + 1,
        )

    # Round 1 starts from b = 0, where the correlations are rho0 (no check needed).
    start = choose_and_solve(rho0_NxQ, jnp.zeros_like(rho0_NxQ))
    ws_QxW, b_QxW, live_Q, it = jax.lax.while_loop(
        lambda c: jnp.any(c[2]) & (c[3] < settings.rounds),
        body,
        (*start, jnp.ones(num_q, bool), 1),
    )
    # Queries still live after the last round were solved again after their last check.
    done_Q = jax.lax.cond(
        jnp.any(live_Q),
        lambda: ~live_Q | (check(ws_QxW, b_QxW)[2] <= stop_Q),
        lambda: ~live_Q,
    )
    return dense(ws_QxW, b_QxW)[:num_examples].T, lam_Q, done_Q


@partial(jax.jit, static_argnames="settings")
def scores_arrays(members_TxS, subsets_NxD, y_QxT, lam_frac, settings: Settings):
    """Lasso at ``lam_frac * lambda_max`` per query by working sets (module docstring).

    Args: ``members_TxS`` / ``subsets_NxD`` int32 design tables (sentinels N / T), ``y_QxT``
    float32 responses, ``lam_frac`` scalar. Returns ``(scores_QxN, lam_Q, converged_Q)``.
    """
    y_QxT = jnp.asarray(y_QxT, jnp.float32)
    fn = partial(
        _chunk_scores,
        members_TxS=members_TxS,
        subsets_NxD=subsets_NxD,
        lam_frac=lam_frac,
        settings=settings,
    )
    return lasso_cd.chunked(fn, y_QxT, settings.query_chunk)
