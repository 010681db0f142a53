"""Recovery through the training rows' own responses (``stride.recovery="kernel"``).

The Lasso decodes each query's T responses alone, with a sparsity prior. But the operators
can also be asked about the training rows themselves: ``R_NxT[i, k]``, training row i's
response to operator k, is computed exactly as a query's (one more pass over the rows, after
stage 1). With first-order responses every operator answers to the mean of its members'
influence, ``y_q = c A b_q`` (A the T x N design with rows 1 / |S_k| on the members, ``c``
the gate's scale), and the training rows' responses are ``R = c K A^T`` with
``K_ij = g_i^T (F + lam)^-1 g_j`` the operator space's influence between training rows. So

    b_q = R (A R + jitter)^-1 y_q

is the posterior mean of b_q under the Gaussian prior whose covariance is K (a query whose
preconditioned gradient is isotropic has exactly that covariance of influences), given the T
responses; equivalently, the query's gradient projected onto the span of the T operators'
gradients. It needs no sparsity: influence on language models is dense (the Lasso keeps most
rows). At T = N (A invertible) it returns the operator-space influence itself; at T < N it
keeps the part of each row's gradient the operators span.

On the validation queries (experiments/RESULTS.md) it scored, at T = N/2 and N/4:
lm_shakespeare 0.364 / 0.316 and chit-chat SFT 0.498 / 0.441 (kernel operators, linear
responses), against the Lasso's 0.313 / 0.233 and 0.463 / 0.378; MNIST-5k 0.719 / 0.716 and
digits 0.697 / 0.696 (the classifiers' hidden / logit operators, forward responses), against 0.711 /
0.678 and 0.687 / 0.646; the residual-stream recipe at N/2 0.315 against 0.240. Forward
responses are not exactly linear in the design, so ``A R`` can have negative eigenvalues
(digits): they are raised to the jitter's floor. Cost: one responses pass over the N
training rows (query-independent, in the fit), N x T floats kept, a T x T Cholesky factor in
float64 on the host; each query then costs an N x T product, dense scores.

At T >= N (``stride.recovery="solve"``), where the design has full column rank (the
interleaved layout; the expander loses a few directions when d divides T), linear responses
determine every row's influence: ``b_q = argmin ||A b - y_q||^2``, the Lasso's lambda -> 0
limit, needs no training rows' responses (at T = N, ``R (A R)^-1 = A^-1`` whatever R is). The
normal equations ``A^T A`` (N x N, float64, formed from the sparse design) are factored once
in the fit; each query then costs a sparse product and an N x N triangular solve pair. On the
validation queries at T = N, on the interleaved design, it scored 0.3947 against the
expander's Lasso 0.3931 on Shakespeare and 0.52497 against 0.52501 on SFT (on the expander
itself 0.3939 / 0.5244; experiments/RESULTS.md, session 13); on a full-rank design it is the
operator-space influence itself (``opspace``), reached through the subsets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import logging

from stride_jax import resources
from stride_jax.errors import ConfigError
from stride_jax.stride.subsets import Design

RECOVERIES = ("lasso", "kernel", "solve", "auto")
# "auto" takes the exact solve at T >= N up to this many training rows: its N x N factor costs
# O(N^3) on the host (N = 2,000: 0.28 s with the normal equations, measured on 2 cores; at
# 16,384, 500 times that by the N^3 count).
SOLVE_MAX_N = 16384


def check_config(cfg) -> None:
    """Refuse an unknown ``stride.recovery`` or a negative ``recovery_jitter`` (by name)."""
    recovery = str(cfg.get("recovery", "lasso"))
    if recovery not in RECOVERIES:
        raise ConfigError(f"stride.recovery must be one of {RECOVERIES}, got {recovery!r}")
    jitter(cfg)


def resolve(cfg, design: Design) -> str:
    """``stride.recovery`` for this design: "lasso", "kernel" or "solve" (refused, before any
    work, when their arrays would not fit, and "solve" when T < N). "auto", for operators in
    closed form (one Gauss-Newton step, ``stage1.init="newton"`` and ``steps=0``: the gates
    are linear in the subsets' mean gradients), is the kernel recovery on a compressive design
    (T < N) and, with linear responses, the exact solve at T >= N (up to ``SOLVE_MAX_N``
    rows); the Lasso otherwise (Adam-trained operators; forward responses at T >= N; arrays
    that would not fit)."""
    check_config(cfg)
    recovery = str(cfg.get("recovery", "lasso"))
    n, t = design.num_examples, design.num_subsets
    if recovery == "auto":
        return _auto(cfg, n, t)
    if recovery == "kernel":
        check_memory(n, t)
    if recovery == "solve":
        check_solve(n, t)
    return recovery


def _auto(cfg, n: int, t: int) -> str:
    s1 = cfg.get("stage1", {})
    closed_form = s1.get("init", "zero") == "newton" and int(s1.get("steps", 1)) == 0
    if not closed_form:
        return _chose("lasso", "Adam-trained operators")
    if t >= n:
        if str(cfg.get("responses", "forward")) != "linear":
            return _chose("lasso", "T >= N, forward responses: not exactly linear in the design")
        fits, need, have = _solve_fits(n)
        if not fits or n > SOLVE_MAX_N:
            why = (
                f"the exact solve's N x N factor for N = {n} ({resources.human_bytes(need)}) "
                f"is past SOLVE_MAX_N = {SOLVE_MAX_N} rows or half of the "
                f"{resources.human_bytes(have)} available"
            )
            return _chose("lasso", why)
        return _chose("solve", f"T = {t} >= N = {n}, closed-form stage 1, linear responses")
    fits, need, have = _fits(n, t)
    if not fits:  # e.g. millions of rows: the Lasso streams, R would not fit
        why = (
            f"the kernel recovery's {resources.human_bytes(need)} exceeds half of the "
            f"{resources.human_bytes(have)} available"
        )
        return _chose("lasso", why)
    return _chose("kernel", f"T = {t} < N = {n}, closed-form stage 1")


def _chose(recovery: str, why: str) -> str:
    logging.info("auto: stride.recovery: auto -> %r (%s)", recovery, why)
    return recovery


def jitter(cfg) -> float:
    value = float(cfg.get("recovery_jitter", 1e-4))
    if not value >= 0:
        raise ConfigError(f"stride.recovery_jitter must be >= 0, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Decoder:
    """The training rows' responses ``r_NxT`` (float32), the factor of ``s (A R) + jitter``
    (T x T, float64: ``("cholesky", cho_factor)``, or ``("eigh", V, 1 / w)`` with the
    eigenvalues floored at the jitter when it is not positive definite) and the sign ``s``
    that makes it positive."""

    r_NxT: np.ndarray
    factor: tuple
    sign: float


def memory_need(num_examples: int, num_subsets: int) -> int:
    """Bytes of the N x T responses (float32) and the T x T system and factor (float64)."""
    return 4 * num_examples * num_subsets + 2 * 8 * num_subsets**2


def _available() -> int:
    return resources.host_available_bytes()


def _fits(num_examples: int, num_subsets: int) -> tuple[bool, int, int]:
    """(whether the recovery's arrays fit in half the host's available memory, their bytes,
    the bytes available)."""
    need, have = memory_need(num_examples, num_subsets), _available()
    return need <= have // 2, need, have


def check_memory(num_examples: int, num_subsets: int) -> None:
    """Refuse, before any work, a recovery whose N x T responses and T x T factor (twice, in
    float64) would take more than half the host's available memory."""
    fits, need, have = _fits(num_examples, num_subsets)
    if not fits:
        raise ConfigError(
            f"stride.recovery='kernel' needs {resources.human_bytes(need)} for the training "
            f"rows' responses (N = {num_examples} x T = {num_subsets}) and the T x T factor, "
            f"more than half of the {resources.human_bytes(have)} available: set "
            "stride.recovery='lasso' (or 'auto' with T >= N)"
        )


def _solve_fits(num_examples: int) -> tuple[bool, int, int]:
    """(whether the exact solve's N x N normal equations and factor, float64, fit in half the
    host's available memory, their bytes, the bytes available)."""
    need, have = 2 * 8 * num_examples**2, _available()
    return need <= have // 2, need, have


def check_solve(num_examples: int, num_subsets: int) -> None:
    """Refuse, before any work, the exact solve on a compressive design (T < N: A b = y has
    many solutions) or one whose N x N factor would not fit in half the host's memory."""
    if num_subsets < num_examples:
        raise ConfigError(
            f"stride.recovery='solve' needs T >= N (A b = y is underdetermined with T = "
            f"{num_subsets} subsets for N = {num_examples} rows): use 'kernel', 'lasso' or "
            "'auto'"
        )
    fits, need, have = _solve_fits(num_examples)
    if not fits:
        raise ConfigError(
            f"stride.recovery='solve' needs {resources.human_bytes(need)} for the N x N normal "
            f"equations (N = {num_examples}), more than half of the "
            f"{resources.human_bytes(have)} available: set stride.recovery='lasso'"
        )


def subset_means(design: Design, r_NxT: np.ndarray) -> np.ndarray:
    """``A R`` (T x T, float64): each subset's mean of its members' rows of ``r_NxT``
    (``mean_operator``, sparse, times R)."""
    n, t = design.num_examples, design.num_subsets
    if r_NxT.shape != (n, t):
        raise ValueError(f"the training rows' responses are {r_NxT.shape}, expected ({n}, {t})")
    return np.asarray(mean_operator(design) @ np.asarray(r_NxT, np.float64))


def factor(design: Design, r_NxT: np.ndarray, jitter_frac: float) -> Decoder:
    """The decoder of ``r_NxT`` (N x T training-row responses): ``A R`` symmetrised, its sign
    made positive (the responses' sign convention cancels), ``jitter_frac`` times its mean
    diagonal added, Cholesky-factored in float64. When it is not positive definite (forward
    responses are not linear in the design), its eigenvalues below that floor are raised to
    it instead (logged; an eigendecomposition, O(T^3) like the Cholesky but slower)."""
    r_NxT = np.asarray(r_NxT, np.float32)
    if not np.isfinite(r_NxT).all():
        raise FloatingPointError(
            "stride.recovery='kernel': the training rows' responses are not finite"
        )
    m = subset_means(design, r_NxT)
    m = (m + m.T) / 2
    scale = float(np.mean(np.diag(m)))
    if scale == 0:
        raise FloatingPointError(
            "stride.recovery='kernel': every training row's response is zero (no operator "
            "moves any training row's loss)"
        )
    sign = 1.0 if scale > 0 else -1.0
    m, floor = sign * m, jitter_frac * abs(scale)
    try:
        chol = scipy.linalg.cho_factor(m + floor * np.eye(len(m)), lower=True, check_finite=False)
        return Decoder(r_NxT, ("cholesky", chol), sign)
    except np.linalg.LinAlgError:
        pass
    # Not positive definite: forward responses are not linear in the design. Its eigenvalues
    # below the floor are raised to it (the nearest positive definite system in that sense).
    if floor <= 0:
        raise FloatingPointError(
            "stride.recovery='kernel': the subsets' mean responses are not positive definite "
            f"and recovery_jitter={jitter_frac:g}: raise stride.recovery_jitter or use "
            "recovery='lasso'"
        )
    w, v = np.linalg.eigh(m)
    low = int((w < floor).sum())
    logging.warning(
        "stride: kernel recovery: the subsets' mean responses are not positive definite "
        "(%d of %d eigenvalues below recovery_jitter x their mean: nonlinear responses); "
        "raised to it",
        low,
        len(w),
    )
    return Decoder(r_NxT, ("eigh", v, 1.0 / np.maximum(w, floor)), sign)


def decode(dec, y_QxT: np.ndarray) -> np.ndarray:
    """scores_QxN = ``(R (A R + jitter)^-1 y_q)`` for every query (float32); a ``Solve``
    gives the least-squares solution instead (``solve_decode``)."""
    if isinstance(dec, Solve):
        return solve_decode(dec, y_QxT)
    y = np.asarray(y_QxT, np.float64)
    if y.ndim != 2 or y.shape[1] != dec.r_NxT.shape[1]:
        raise ValueError(f"responses {y.shape} do not match the decoder's T = {dec.r_NxT.shape[1]}")
    # (A R)^-1 = s (s A R)^-1: the factor's sign goes onto the responses.
    kind, *parts = dec.factor
    if kind == "cholesky":
        alpha_TxQ = scipy.linalg.cho_solve(parts[0], dec.sign * y.T, check_finite=False)
    else:  # eigenvectors and inverted (floored) eigenvalues
        v, inv_w = parts
        alpha_TxQ = v @ (inv_w[:, None] * (v.T @ (dec.sign * y.T)))
    out = jnp.matmul(
        jnp.asarray(dec.r_NxT),
        jnp.asarray(alpha_TxQ, jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return np.asarray(out, np.float32).T


@dataclasses.dataclass(frozen=True)
class Solve:
    """The exact solve's decoder: the design's mean operator ``A`` (T x N, row k holding
    1 / |S_k| on its members; scipy CSR, float64) and the Cholesky factor of
    ``A^T A + eps I`` (N x N, float64; ``_SOLVE_RIDGE``)."""

    a_TxN: object
    chol: tuple


# The ridge on A^T A, relative to its largest diagonal entry. A full-rank design is solved
# exactly (its smallest eigenvalue on lm_shakespeare is 5e-7 of the largest, far above it);
# a rank-deficient one (``subsets.expander`` when d divides T: blocks of rows that meet every
# subset once) gets, in its null directions, the minimum-norm split the ridge's limit is.
_SOLVE_RIDGE = 1e-10
# A Cholesky pivot below this (squared, relative to the largest) counts as a null direction
# in the log (the ridge's pivots sit near _SOLVE_RIDGE; a real direction's at 1e-7 and up).
_NULL_PIVOT = 1e-8


def mean_operator(design: Design):
    """``A`` of the responses' model ``y = c A b`` as a sparse matrix (T x N, float64): each
    subset's mean over its members."""
    import scipy.sparse

    t, n = design.num_subsets, design.num_examples
    members = design.members_TxS
    rows = np.repeat(np.arange(t), members.shape[1])
    cols = members.reshape(-1)
    keep = cols < n
    weights = (1.0 / np.maximum(design.sizes_T, 1))[rows[keep]]
    return scipy.sparse.csr_matrix((weights, (rows[keep], cols[keep])), shape=(t, n))


def solve_factor(design: Design) -> Solve:
    """Factor ``A^T A`` (``mean_operator``; N x N from the sparse design) once for every
    query, with the tiny ridge ``_SOLVE_RIDGE``; a rank-deficient design is logged with the
    number of its null directions."""
    check_solve(design.num_examples, design.num_subsets)
    a = mean_operator(design)
    m = (a.T @ a).toarray()
    top = float(np.max(np.diag(m)))
    if not top > 0:
        raise ValueError("stride.recovery='solve': the design has no members")
    m[np.diag_indices_from(m)] += _SOLVE_RIDGE * top
    chol = scipy.linalg.cho_factor(m, lower=True, check_finite=False)
    null = int((np.diag(chol[0]) ** 2 < _NULL_PIVOT * top).sum())
    if null:
        logging.warning(
            "stride: exact solve: the design is rank-deficient (%d of %d directions of A^T A "
            "are null: blocks of rows that meet the same subsets); those directions get the "
            "minimum-norm split",
            null,
            design.num_examples,
        )
    return Solve(a, chol)


def solve_decode(dec: Solve, y_QxT: np.ndarray) -> np.ndarray:
    """scores_QxN = ``argmin_b ||A b - y_q||^2`` for every query (float32; the minimum-norm
    one in a rank-deficient design's null directions)."""
    y = np.asarray(y_QxT, np.float64)
    t = dec.a_TxN.shape[0]
    if y.ndim != 2 or y.shape[1] != t:
        raise ValueError(f"responses {y.shape} do not match the design's T = {t}")
    b_NxQ = scipy.linalg.cho_solve(dec.chol, dec.a_TxN.T @ y.T, check_finite=False)
    return np.asarray(b_NxQ.T, np.float32)
