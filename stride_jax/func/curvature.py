"""Curvature of the training loss: Kronecker factors (K-FAC / EK-FAC) and the dense Hessian.

K-FAC works from a task's dense layers (``Task.dense_io``): per layer the inputs a_t and the
output gradients g_t at every token t of a row, so the row's kernel gradient is
G = sum_t a_t g_t^T. With ``io(rows, key) -> (a_L, mask_BxT, terms)`` (``dense_io`` bound to
its params and layers) these functions build, over all training rows ``chunk`` at a time:

- ``kron_factors``: A = E_tokens[a a^T] over real tokens, S = E_tokens[g g^T] (summed over the
  Fisher terms with their weights), both divided by the number of real tokens;
- ``eigenbases``: the eigendecompositions of A and S (Q_A, Q_S);
- ``ekfac_eigenvalues``: Lambda_ij = E_rows[(Q_A^T G Q_S)_ij^2], the exact diagonal of the
  row-gradient Fisher in the Kronecker eigenbasis (George et al. 2018); a row of one token
  (a classifier's) has G = a g^T of rank one, so Lambda is E[(Q_A^T a)^2 (Q_S^T g)^2];
- ``precondition``: Q_A [(Q_A^T V Q_S) / Lambda] Q_S^T for gradient matrices V.

``hessian``: the dense P x P Hessian of a weighted mean loss over flat parameters, column
block by column block with Hessian-vector products (exact influence on tiny models).

Rows come in padded chunks with row weights (``chunked``): a padding row adds nothing.
``key`` (sampled Fisher targets) is folded with the chunk index, so the factors and the
eigenvalue refit see the same targets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from stride_jax.func.grads import HIGHEST, num_rows, padded_chunks


@functools.partial(jax.jit, static_argnums=1)
def chunked(data: dict, chunk: int) -> tuple[dict, jax.Array]:
    """(rows as K x C x ..., w_KxC: 1 for the real rows, 0 for the padding). Build them
    outside the passes' ``jit`` and pass them in: XLA fuses weights it sees as constants
    differently, which changes the round-off (and ill-conditioned curvature amplifies it).
    Jitted itself: one program, where op by op a fresh process compiled about 15."""
    w = padded_chunks({"w": jnp.ones(num_rows(data), jnp.float32)}, chunk)["w"]
    return padded_chunks(data, chunk), w


def _scan(body, init, chunks: dict, w: jax.Array, key, xs_K=None):
    """``body(acc, rows, w_C, key_or_None[, x]) -> (acc, rows counted)`` over the chunks
    (``x``: the chunk's slice of ``xs_K`` when given); returns (acc, total count)."""

    def step(acc, xs):
        rows, w_C, c, x = xs
        k = None if key is None else jax.random.fold_in(key, c)
        return body(acc, rows, w_C, k) if xs_K is None else body(acc, rows, w_C, k, x)

    acc, n_K = jax.lax.scan(step, init, (chunks, w, jnp.arange(w.shape[0]), xs_K))
    return acc, n_K.sum()


def io_shapes(io, rows: dict) -> list[tuple[int, int]]:
    """[(I_l, O_l)] per layer, from an abstract call of ``io`` on ``rows``."""
    # A key, not None: a sampled-Fisher io draws labels even when only shapes are asked for.
    a_L, _, terms = jax.eval_shape(io, rows, jax.random.key(0))[:3]
    return [(a.shape[-1], g.shape[-1]) for a, g in zip(a_L, terms[0][1], strict=True)]


def kron_factors(io, chunks: dict, w_KxC, key=None, extra=None, shapes=None):
    """[(A_IxI, S_OxO)] per layer: E[a a^T] over real tokens, E[g g^T] per real token.
    ``shapes``: [(I_l, O_l)] when the caller knows them (else ``io`` is traced once more for
    them).

    ``extra = (init, step, xs_K)`` accumulates something else in the same pass over the rows
    (one forward and backward for both): ``step(acc, rows, w_C, x, out)``, ``out`` all that
    ``io`` returned (``(a_L, mask, terms, ...)``: the factors read the first three), ``x`` the
    chunk's slice of ``xs_K``; then the result is (factors, acc)."""

    def outer(u_BxTxD, wt_BxT):  # sum over rows and tokens of wt u u^T
        if u_BxTxD.shape[1] == 1:  # one token per row: a plain matmul
            return (u_BxTxD[:, 0] * wt_BxT).T @ u_BxTxD[:, 0]
        return jnp.einsum("bti,btj->ij", u_BxTxD * wt_BxT[..., None], u_BxTxD)

    def factors(acc, rows, w_C, k):
        out = io(rows, k)
        a_L, mask, terms = out[:3]
        m = mask * w_C[:, None]
        new = []
        for i, (a_acc, s_acc) in enumerate(acc):
            s_new = sum(outer(g[i], (wt * w_C)[:, None]) for wt, g in terms)
            new.append((a_acc + outer(a_L[i], m), s_acc + s_new))
        return new, m.sum(), out

    if shapes is None:
        shapes = io_shapes(io, jax.tree.map(lambda a: a[0], chunks))
    init = [(jnp.zeros((i, i)), jnp.zeros((o, o))) for i, o in shapes]
    if extra is None:
        acc, n_tok = _scan(lambda *a: factors(*a)[:2], init, chunks, w_KxC, key)
        return [(a / n_tok, s / n_tok) for a, s in acc]
    init_x, step_x, xs_K = extra

    def body(acc, rows, w_C, k, x):
        new, n, out = factors(acc[0], rows, w_C, k)
        return (new, step_x(acc[1], rows, w_C, x, out)), n

    (acc, acc_x), n_tok = _scan(body, (init, init_x), chunks, w_KxC, key, xs_K)
    return [(a / n_tok, s / n_tok) for a, s in acc], acc_x


@jax.jit
def eigenbases(factors):
    """([eigenvalues of A], [Q_A], [eigenvalues of S], [Q_S]) of the symmetrised factors."""
    ea = [jnp.linalg.eigh(0.5 * (a + a.T)) for a, _ in factors]
    es = [jnp.linalg.eigh(0.5 * (s + s.T)) for _, s in factors]
    return [e[0] for e in ea], [e[1] for e in ea], [e[0] for e in es], [e[1] for e in es]


def kfac_eigenvalues(la, ls) -> list[jax.Array]:
    """K-FAC's Lambda_IxO = lambda_A lambda_S^T (round-off negatives clipped to 0)."""
    return [jnp.maximum(a, 0)[:, None] * jnp.maximum(s, 0) for a, s in zip(la, ls, strict=True)]


def row_grads(a_BxTxI, g_BxTxO) -> jax.Array:
    """G_BxIxO = sum_t a_t g_t^T: each row's kernel gradient."""
    return jnp.einsum("bti,bto->bio", a_BxTxI, g_BxTxO, precision=HIGHEST)


def ekfac_eigenvalues(io, chunks: dict, w_KxC, qa, qs, key=None, extra=None):
    """EK-FAC's Lambda_IxO = E_rows[(Q_A^T G Q_S)^2] per layer (the Fisher terms summed).

    ``extra = (init, step, xs_K)`` accumulates something else in the same pass, as in
    ``kron_factors``, with the eigenbases too: ``step(acc, rows, w_C, x, out, qa, qs)``; then
    the result is (Lambda, acc)."""

    def layer(a, g, wt, q_a, q_s):
        if a.shape[1] == 1:  # one token per row: G = a g^T has rank one
            return ((a[:, 0] @ q_a) ** 2 * wt[:, None]).T @ (g[:, 0] @ q_s) ** 2
        rot = jnp.einsum("ai,nab,bj->nij", q_a, row_grads(a, g), q_s, precision=HIGHEST)
        return (rot**2 * wt[:, None, None]).sum(0)

    def body(acc, rows, w_C, k, x=None):
        out = io(rows, k)
        a_L, _, terms = out[:3]
        new = [
            u + sum(layer(a_L[i], g[i], wt * w_C, qa[i], qs[i]) for wt, g in terms)
            for i, u in enumerate(acc[0])
        ]
        acc_x = None if extra is None else extra[1](acc[1], rows, w_C, x, out, qa, qs)
        return (new, acc_x), w_C.sum()

    init = [jnp.zeros((a.shape[0], s.shape[0])) for a, s in zip(qa, qs, strict=True)]
    init_x, xs_K = (None, None) if extra is None else (extra[0], extra[2])
    (lam, acc_x), n_rows = _scan(body, (init, init_x), chunks, w_KxC, key, xs_K)
    lam = [m / n_rows for m in lam]
    return lam if extra is None else (lam, acc_x)


def precondition(qa, qs, lam, grads_L):
    """Per layer Q_A [(Q_A^T V Q_S) / Lambda] Q_S^T for a batch of V (Q x I x O); ``lam`` is
    already damped."""
    out = []
    for v, q_a, q_s, m in zip(grads_L, qa, qs, lam, strict=True):
        rot = jnp.einsum("ai,qab,bj->qij", q_a, v, q_s) / m
        out.append(jnp.einsum("ai,qij,bj->qab", q_a, rot, q_s))
    return out


def dense_dots(a_L, g_L, pre_L) -> jax.Array:
    """scores_BxQ = sum over layers of <G_b, P_q> for rows given by their factors (a, g) and
    preconditioned query gradients P (Q x I x O); G is formed only for multi-token rows."""
    out = 0
    for a, g, p in zip(a_L, g_L, pre_L, strict=True):
        if a.shape[1] == 1:
            out = out + jnp.einsum("bi,qio,bo->bq", a[:, 0], p, g[:, 0], precision=HIGHEST)
        else:
            out = out + flat_dots(row_grads(a, g), p)
    return out


def flat_dots(a_Bx, b_Qx) -> jax.Array:
    """B x Q inner products of two stacks of same-shaped arrays, flattened first: XLA's CPU
    dot on the 3-d operands (``"bio,qio->bq"``) was 2.6x slower at lm_shakespeare's sizes."""
    a, b = a_Bx.reshape(len(a_Bx), -1), b_Qx.reshape(len(b_Qx), -1)
    return jnp.einsum("bp,qp->bq", a, b, precision=HIGHEST)


def hessian(loss_fn, flat_P: jax.Array, chunks: dict, w_KxC, hvp_batch: int) -> jax.Array:
    """H_PxP of the mean over rows of ``loss_fn(flat_P, rows) -> B`` (symmetrised), one chunk
    of rows at a time, P Hessian-vector products per chunk (``hvp_batch`` at a time)."""
    p = flat_P.size
    n = w_KxC.sum()
    eye = jnp.eye(p, dtype=flat_P.dtype)

    def body(h, rows, w_C, _):
        def loss(f):
            return (loss_fn(f, rows) * w_C).sum() / n

        def hvp(v):
            return jax.jvp(jax.grad(loss), (flat_P,), (v,))[1]

        return h + jax.lax.map(hvp, eye, batch_size=min(hvp_batch, p)), w_C.sum()

    h, _ = _scan(body, jnp.zeros((p, p), flat_P.dtype), chunks, w_KxC, None)
    return 0.5 * (h + h.T)
