"""Influence functions (Koh & Liang 2017): exact (tiny models), K-FAC and EK-FAC.

Sign. Upweighting training example i by eps in the mean training loss moves the optimum by
``-eps H^-1 g_i`` and so changes the query loss by ``-eps g_q^T H^-1 g_i`` (Koh & Liang's
I_up,loss). We return the NEGATIVE of that derivative, ``score(q, i) = + g_q^T H^-1 g_i``:
positive means upweighting i lowers the query loss (i helps), as every method here.

- ``exact_if``: H = Hessian of the mean training cross-entropy over ALL parameters (built
  column block by column block with Hessian-vector products, data in chunks), plus
  ``damping * I``; LU-factorised once in float64 on the host. H need not be positive definite
  (the base model is not at an exact minimum and is trained with weight decay): where
  ``lambda + damping`` is near 0 the scores blow up; raise ``damping`` then. Refuses models
  with more than ``cfg.max_exact_params`` parameters.
- ``kfac`` / ``ekfac``: block-diagonal over the MLP's ``nnx.Linear`` layers (bias folded in as
  an input column of ones). Per layer, A = E[a a^T] (inputs with a 1 appended) and
  S = E[g g^T] (gradients of the per-example loss w.r.t. the pre-activations). With
  eigenbases Q_A, Q_S and gradient matrix V (in x out):
  ``F^-1 V = Q_A [(Q_A^T V Q_S) / (Lambda + damping)] Q_S^T``, with
  Lambda = lambda_A lambda_S^T (K-FAC) or, for EK-FAC (George et al. 2018), the refitted
  Lambda_ij = E[(Q_A^T a)_i^2 (Q_S^T g)_j^2]: the exact diagonal of the layer's Fisher block
  in the Kronecker eigenbasis. Damping is added to Lambda, i.e. to the approximate Fisher
  itself ((A (x) S + damping I)^-1 for K-FAC, not the factored (A + sqrt(d) I) (x) (S + ...)),
  so K-FAC and EK-FAC equal the dense (F + damping I)^-1 when the factorisation is exact.
- ``cfg.fisher``: "empirical" (default) uses the training labels for g, so the curvature is
  the empirical Fisher E[grad grad^T] of the very gradients being scored; "true" uses the
  model's predictive distribution, summed EXACTLY over all C classes (no label sampling, so
  deterministic): E_x sum_c p_c g_c g_c^T, which is the Gauss-Newton matrix for softmax
  cross-entropy (C backward passes per chunk). Scored gradients always use the true labels.

Training examples are scored in chunks (``lax.map`` with ``batch_size=cfg.chunk``); per-layer
training gradients stay in the factored form g a^T and are never materialised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.linalg
from flax import nnx
from jax.flatten_util import ravel_pytree

from stride_jax.baselines import base, graddot
from stride_jax.models import mlp

# Damping chosen on digits' validation queries with experiments/tune.py (K-FAC LDS: 1e-5 0.645,
# 1e-4 0.661, 1e-3 0.642, 0.1 0.392, 10 0.287); exact IF keeps 1e-3 (tiny models only).
_DAMPING = {"kfac": 1e-4, "ekfac": 1e-4, "exact_if": 1e-3}


def default_config(name: str = "kfac") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(damping=_DAMPING[name], fisher="empirical", chunk=256, max_exact_params=5000)
    )


def _arrays(ds):
    return jnp.asarray(ds.x_NxF), jnp.asarray(ds.y_N)


def _padded_chunks(x_NxF, y_N, chunk: int):
    """(x, y, w) reshaped to (num_chunks, chunk, ...), zero-weight padding rows at the end."""
    n = x_NxF.shape[0]
    chunk = max(1, min(int(chunk), n))
    pad = -n % chunk
    w = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)])
    x = jnp.concatenate([x_NxF, jnp.zeros((pad, x_NxF.shape[1]), x_NxF.dtype)])
    y = jnp.concatenate([y_N, jnp.zeros(pad, y_N.dtype)])
    k = (n + pad) // chunk
    return x.reshape(k, chunk, -1), y.reshape(k, chunk), w.reshape(k, chunk)


# ---------------------------------------------------------------- exact influence


def num_params(task) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(task.params)))


def hessian(task, chunk: int = 256) -> jax.Array:
    """P x P Hessian of the mean training cross-entropy w.r.t. the ravel_pytree'd params."""
    chunks = _padded_chunks(*_arrays(task.train), chunk)
    return _hessian(task.graphdef, task.params, *chunks, max(1, int(chunk)))


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _hessian(graphdef, params, xs, ys, ws, chunk):
    flat, unravel = ravel_pytree(params)
    p, n = flat.size, ws.sum()

    def block(h, data):  # one chunk of training data, P Hessian-vector products
        xb, yb, wb = data

        def loss(f):
            return (mlp.cross_entropy(mlp.apply(graphdef, unravel(f), xb), yb) * wb).sum() / n

        def hvp(v):
            return jax.jvp(jax.grad(loss), (flat,), (v,))[1]

        eye = jnp.eye(p, dtype=flat.dtype)
        return h + jax.lax.map(hvp, eye, batch_size=min(chunk, p)), None

    h, _ = jax.lax.scan(block, jnp.zeros((p, p), flat.dtype), (xs, ys, ws))
    return 0.5 * (h + h.T)


_query_grads = jax.jit(graddot.per_example_grads, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score_flat(graphdef, params, x_tr, y_tr, precond_PxQ, chunk):
    """scores_QxN = precond^T g_i over flattened per-example training gradients, in chunks."""

    def one(args):
        return graddot.per_example_grads(graphdef, params, args[0][None], args[1][None])[0]

    return jax.lax.map(lambda a: one(a) @ precond_PxQ, (x_tr, y_tr), batch_size=chunk).T


def exact_fit(task, cfg):
    p = num_params(task)
    if p > cfg.max_exact_params:
        raise ValueError(
            f"exact_if: the model has {p} parameters > max_exact_params={cfg.max_exact_params}; "
            "the dense P x P Hessian is only for tiny models (use kfac / ekfac)"
        )
    h = np.asarray(hessian(task, cfg.chunk), np.float64)
    return {"lu": scipy.linalg.lu_factor(h + cfg.damping * np.eye(p))}


def exact_score(task, state, query, cfg):
    x_q, y_q = _arrays(query)
    g_q = np.asarray(_query_grads(task.graphdef, task.params, x_q, y_q), np.float64)
    pre = jnp.asarray(scipy.linalg.lu_solve(state["lu"], g_q.T), jnp.float32)  # (H+dI)^-1 g_q
    out = _score_flat(task.graphdef, task.params, *_arrays(task.train), pre, max(1, cfg.chunk))
    return base.as_scores(out)


# ---------------------------------------------------------------- K-FAC / EK-FAC


def linears(graphdef, params):
    """[(kernel in x out, bias out)] for every nnx.Linear of the MLP, input to output."""
    model = nnx.merge(graphdef, params)
    layers = [*model.layers, model.head]
    out = [(lin.kernel[...], lin.bias[...]) for lin in layers]
    covered = sum(k.size + b.size for k, b in out)
    if covered != sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)):
        raise ValueError("kfac/ekfac: the model has parameters outside its nnx.Linear layers")
    return out


def layer_grads(weights, x_BxF, labels_B):
    """Per-example factors: ([a_l: B x (in+1)], [g_l: B x out], logits B x C).

    a_l is layer l's input with a 1 appended; g_l = d CE(example b) / d pre-activation_l, so
    the per-example gradient of [kernel; bias] is the outer product a_l^T g_l.
    """

    def forward(eps):
        h, acts = x_BxF, []
        for i, (k, b) in enumerate(weights):
            acts.append(jnp.concatenate([h, jnp.ones((h.shape[0], 1), h.dtype)], axis=1))
            s = h @ k + b + eps[i]
            h = s if i == len(weights) - 1 else jax.nn.gelu(s)
        return h, acts

    eps = [jnp.zeros((x_BxF.shape[0], k.shape[1]), x_BxF.dtype) for k, _ in weights]
    logits, acts = forward(eps)

    def total(eps, y):
        return mlp.cross_entropy(forward(eps)[0], y).sum()

    return acts, jax.grad(total)(eps, labels_B), logits


def _terms(weights, x, y, w, fisher):
    """Layer inputs and the weighted gradient terms of one chunk of training examples.

    Returns (acts, [(weight_B, [g_l])]): one term with the true labels ("empirical"), or one
    per class c weighted by p_c(x) ("true": the expectation over the predictive distribution).
    """
    acts, gs, logits = layer_grads(weights, x, y)
    if fisher == "empirical":
        return acts, [(w, gs)]
    if fisher != "true":
        raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
    probs = jax.nn.softmax(logits) * w[:, None]
    terms = []
    for c in range(logits.shape[1]):
        labels = jnp.full_like(y, c)
        terms.append((probs[:, c], layer_grads(weights, x, labels)[1]))
    return acts, terms


@functools.partial(jax.jit, static_argnames="fisher")
def _kron_factors(weights, xs, ys, ws, fisher):
    """Per layer A = E[a a^T] and S = E[g g^T] over the (padded, chunked) training set."""
    n = ws.sum()

    def body(acc, data):
        x, y, w = data
        acts, terms = _terms(weights, x, y, w, fisher)
        a_new = [u + (a * w[:, None]).T @ a for u, a in zip(acc[0], acts, strict=True)]
        s_new = [
            u + sum((gs[i] * wt[:, None]).T @ gs[i] for wt, gs in terms)
            for i, u in enumerate(acc[1])
        ]
        return (a_new, s_new), None

    init = (
        [jnp.zeros((k.shape[0] + 1,) * 2) for k, _ in weights],
        [jnp.zeros((k.shape[1],) * 2) for k, _ in weights],
    )
    (a_sum, s_sum), _ = jax.lax.scan(body, init, (xs, ys, ws))
    return [m / n for m in a_sum], [m / n for m in s_sum]


@functools.partial(jax.jit, static_argnames="fisher")
def _ekfac_eigenvalues(weights, xs, ys, ws, qa, qs, fisher):
    """Per layer Lambda_ij = E[(Q_A^T a)_i^2 (Q_S^T g)_j^2] (EK-FAC's refitted eigenvalues)."""
    n = ws.sum()

    def body(acc, data):
        x, y, w = data
        acts, terms = _terms(weights, x, y, w, fisher)
        out = []
        for i, u in enumerate(acc):
            a2 = (acts[i] @ qa[i]) ** 2
            out.append(u + sum((a2 * wt[:, None]).T @ (gs[i] @ qs[i]) ** 2 for wt, gs in terms))
        return out, None

    init = [jnp.zeros((k.shape[0] + 1, k.shape[1])) for k, _ in weights]
    lam, _ = jax.lax.scan(body, init, (xs, ys, ws))
    return [m / n for m in lam]


def _kfac_fit(task, cfg, eigen_correct: bool):
    if cfg.fisher not in ("empirical", "true"):
        raise ValueError(f"fisher must be 'empirical' or 'true', got {cfg.fisher!r}")
    weights = linears(task.graphdef, task.params)
    chunks = _padded_chunks(*_arrays(task.train), cfg.chunk)
    a_fac, s_fac = _kron_factors(weights, *chunks, cfg.fisher)
    la, qa = zip(*[jnp.linalg.eigh(0.5 * (m + m.T)) for m in a_fac], strict=True)
    ls, qs = zip(*[jnp.linalg.eigh(0.5 * (m + m.T)) for m in s_fac], strict=True)
    qa, qs = list(qa), list(qs)
    if eigen_correct:
        lam = _ekfac_eigenvalues(weights, *chunks, qa, qs, cfg.fisher)
    else:  # factors are PSD; clip round-off negatives
        lam = [jnp.maximum(a, 0)[:, None] * jnp.maximum(s, 0) for a, s in zip(la, ls, strict=True)]
    return {"qa": qa, "qs": qs, "lam": list(lam)}


def kfac_fit(task, cfg):
    return _kfac_fit(task, cfg, eigen_correct=False)


def ekfac_fit(task, cfg):
    return _kfac_fit(task, cfg, eigen_correct=True)


def precondition(state, grads_QxIxO, damping: float):
    """Per layer Q_A [(Q_A^T V Q_S) / (Lambda + damping)] Q_S^T for a batch of V (Q x in x out)."""
    out = []
    for v, qa, qs, lam in zip(grads_QxIxO, state["qa"], state["qs"], state["lam"], strict=True):
        rot = jnp.einsum("ai,qab,bj->qij", qa, v, qs) / (lam + damping)
        out.append(jnp.einsum("ai,qij,bj->qab", qa, rot, qs))
    return out


def kfac_score(task, state, query, cfg):
    train, query = _arrays(task.train), _arrays(query)
    out = _kfac_scores(task.graphdef, task.params, state, *train, *query, cfg.damping, cfg.chunk)
    return base.as_scores(out)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _kfac_scores(graphdef, params, state, x_tr, y_tr, x_q, y_q, damping, chunk):
    weights = linears(graphdef, params)
    acts, gs, _ = layer_grads(weights, x_q, y_q)
    grads_q = [jnp.einsum("qa,qb->qab", a, g) for a, g in zip(acts, gs, strict=True)]
    pre = precondition(state, grads_q, damping)  # per layer Q x in x out, computed once

    def one(args):  # one training example: sum_l a_l^T P_l g_l, never forming g a^T
        acts, gs, _ = layer_grads(weights, args[0][None], args[1][None])
        return sum(
            jnp.einsum("a,qab,b->q", a[0], p, g[0]) for a, g, p in zip(acts, gs, pre, strict=True)
        )

    return jax.lax.map(one, (x_tr, y_tr), batch_size=max(1, chunk)).T


base.register("exact_if", exact_fit, exact_score)
base.register("kfac", kfac_fit, kfac_score)
base.register("ekfac", ekfac_fit, kfac_score)
