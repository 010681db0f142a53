"""EK-FAC influence (George et al. 2018; Grosse et al. 2023) on a decoder's dense layers.

The chosen parameters are those of ``lm_grad`` (default: the MLP of the last ``layers``
blocks); EK-FAC covers their dense kernels W (in x out; biases are left out). Per layer:

- token-level Kronecker factors A = E[x x^T] over real tokens (layer inputs) and
  S = E[g g^T] (gradients of the row loss w.r.t. the layer outputs), with their eigenbases
  Q_A, Q_S. ``fisher="empirical"`` (default) takes g from the data's next tokens, the very
  gradients being scored; ``"sampled"`` draws the targets from the model's own predictive
  distribution (one sample per position, ``seed``): the true Fisher, as Kronfluence does.
- eigenvalue correction: Lambda_ij = E_rows[(Q_A^T G Q_S)_ij^2] with G = sum_t x_t g_t^T the
  row's kernel gradient (same targets as the factors): the exact diagonal of the row-gradient
  Fisher in the Kronecker eigenbasis.
- damping: lam = ``damping`` x mean(Lambda) per layer (relative, as Kronfluence).

Sign (as ``influence``): upweighting row i changes the query loss by -g_q^T (F + lam)^-1 g_i,
so ``score(q, i) = + g_q^T (F + lam)^-1 g_i``: positive means row i helps. Query gradients
are preconditioned once (Q x in x out per layer); training rows are scored ``chunk`` at a time
from their factored gradients x, g.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from stride_jax.baselines import base, influence, lm_grad

_HI = jax.lax.Precision.HIGHEST


def default_config(name: str = "ekfac") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(layers=1, params_filter="", chunk=16, damping=0.1, fisher="empirical", seed=0)
    )


def _row_grads(io) -> list[jax.Array]:
    """Per layer G_BxIxO = sum_t x_t g_t^T."""
    return [jnp.einsum("bti,bto->bio", x, g, precision=_HI) for x, g in io]


@functools.partial(jax.jit, static_argnames=("graphdef", "paths", "chunk"))
def eigenvalues(graphdef, params, paths, data: dict, chunk: int, qa, qs, key=None):
    """Per layer Lambda_IxO = E_rows[(Q_A^T G Q_S)^2] (padding rows add zero)."""
    chunks = lm_grad.padded_chunks(data, chunk)

    def body(acc, xs):
        rows, c = xs
        k = None if key is None else jax.random.fold_in(key, c)
        grads = _row_grads(lm_grad.layer_io(graphdef, params, paths, rows, k))
        return [
            u + (jnp.einsum("ai,nab,bj->nij", a, v, s, precision=_HI) ** 2).sum(0)
            for u, v, a, s in zip(acc, grads, qa, qs, strict=True)
        ], None

    init = [jnp.zeros((a.shape[0], s.shape[0])) for a, s in zip(qa, qs, strict=True)]
    nc = chunks["tokens"].shape[0]
    lam, _ = jax.lax.scan(body, init, (chunks, jnp.arange(nc)))
    return [m / data["tokens"].shape[0] for m in lam]


def fit(task, cfg):
    if cfg.fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {cfg.fisher!r}")
    paths = lm_grad.kernel_paths(lm_grad.param_names(task, cfg))
    key = None if cfg.fisher == "empirical" else jax.random.key(cfg.seed)
    data, chunk = task.data(), int(cfg.chunk)
    covs = lm_grad.covariances(task.graphdef, task.params, paths, data, chunk, key)
    qa = [jnp.linalg.eigh(0.5 * (a + a.T))[1] for a, _ in covs]
    qs = [jnp.linalg.eigh(0.5 * (s + s.T))[1] for _, s in covs]
    lam = eigenvalues(task.graphdef, task.params, paths, data, chunk, qa, qs, key)
    lam = [m + cfg.damping * m.mean() for m in lam]
    return {"paths": paths, "qa": qa, "qs": qs, "lam": lam}


@functools.partial(jax.jit, static_argnames=("graphdef", "paths", "chunk"))
def scores(graphdef, params, paths, state, train: dict, query: dict, chunk: int):
    """scores_QxN = sum over layers of <(F + lam)^-1 G_q, G_i> (``state["lam"]`` damped)."""

    def grads(rows):
        return _row_grads(lm_grad.layer_io(graphdef, params, paths, rows))

    pre = influence.precondition(state, lm_grad.map_rows(grads, query, chunk), 0.0)

    def dots(rows):
        return sum(
            jnp.einsum("bio,qio->bq", g, p, precision=_HI)
            for g, p in zip(grads(rows), pre, strict=True)
        )

    return lm_grad.map_rows(dots, train, chunk).T


def score(task, state, query, cfg):
    factors = {k: state[k] for k in ("qa", "qs", "lam")}
    out = scores(
        task.graphdef,
        task.params,
        state["paths"],
        factors,
        task.data(),
        task.data(query),
        int(cfg.chunk),
    )
    return base.as_scores(out)


base.register_lm("ekfac", fit, score)
