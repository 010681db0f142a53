"""Influence functions (Koh & Liang 2017): exact (tiny models), K-FAC and EK-FAC, any task.

Sign. Upweighting training row i by eps in the mean training loss moves the optimum by
``-eps H^-1 g_i`` and so changes the query loss by ``-eps g_q^T H^-1 g_i`` (Koh & Liang's
I_up,loss). The score is its negative, ``score(q, i) = + g_q^T H^-1 g_i``: positive means
upweighting i lowers the query loss (i helps), as for every method.

- ``exact_if``: H = Hessian of the mean training loss (``task.loss``) over the parameters
  ``task.param_names(cfg)`` chooses (a classifier: all of them), built column block by
  column block with Hessian-vector products, plus ``damping * I``; LU-factorised once in
  float64 on the host. H need not be positive definite (the base model is not at an exact
  minimum and is trained with weight decay): where ``lambda + damping`` is near 0 the scores
  blow up; raise ``damping`` then. Refuses more than ``max_exact_params`` parameters. The code
  needs only ``task.loss``, but it is registered for classifiers: no decoder's parameter
  subset is small enough for a dense Hessian by default.
- ``kfac`` / ``ekfac``: block-diagonal over the task's dense layers (``task.dense_layers``:
  every ``nnx.Linear`` of a classifier, bias folded in as an input column of ones; a
  decoder's last MLP kernels), from token-level inputs a and output gradients g
  (``task.dense_io``; ``stride_jax.func.curvature``). Per layer A = E[a a^T], S = E[g g^T],
  eigenbases Q_A, Q_S, and for a row gradient V: ``F^-1 V = Q_A [(Q_A^T V Q_S) / (Lambda +
  lam)] Q_S^T`` with Lambda = lambda_A lambda_S^T (K-FAC) or, for EK-FAC (George et al.
  2018), the refitted Lambda_ij = E_rows[(Q_A^T G Q_S)_ij^2], the exact diagonal of the layer's
  Fisher block in the Kronecker eigenbasis. The damping ``lam`` is added to Lambda, i.e. to the
  approximate Fisher itself, so K-FAC and EK-FAC equal the dense (F + lam I)^-1 when the
  factorisation is exact: ``lam = damping`` or, with ``relative_damping``, ``damping x
  mean(Lambda)`` per layer (as Kronfluence; the decoder default).
- ``fisher``: "empirical" (default) takes g from the data's targets, the very gradients being
  scored; "true" (classifiers) the exact expectation over the model's predictive distribution
  (C backward passes: the Gauss-Newton matrix of softmax cross-entropy); "sampled" targets
  drawn from it (``seed``; one per token). Scored gradients always use the data's targets.

Rows are processed ``chunk`` at a time; training gradients stay in the factored form
(a, g) for one-token rows and are formed as G only per chunk otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.linalg
from absl import logging
from jax.flatten_util import ravel_pytree

from stride_jax import methods
from stride_jax.errors import ConfigError
from stride_jax.func import curvature, grads, programs

FISHERS = ("empirical", "true", "sampled")

# Classifier damping chosen on digits' validation queries with experiments/tune.py (K-FAC LDS:
# 1e-5 0.645, 1e-4 0.661, 1e-3 0.642, 0.1 0.392, 10 0.287); exact IF keeps 1e-3 (tiny models).
_CLASSIFIER_DAMPING = {"kfac": 1e-4, "ekfac": 1e-4, "exact_if": 1e-3}


def default_config(name: str, kind: str) -> ml_collections.ConfigDict:
    """``name``'s defaults for a task ``kind`` (those of the per-kind code it replaces)."""
    if kind == "classifier":
        cfg = dict(damping=_CLASSIFIER_DAMPING[name], fisher="empirical", chunk=256)
        cfg.update(max_exact_params=5000)
        if name != "exact_if":
            cfg.update(relative_damping=False)
    else:
        cfg = dict(layers=1, params_filter="", chunk=16, damping=0.1, fisher="empirical", seed=0)
        cfg.update(relative_damping=True)
    return ml_collections.ConfigDict(cfg)


def _check_fisher(cfg) -> None:
    if cfg.fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {cfg.fisher!r}")


# ---------------------------------------------------------------- exact influence


def _flat_loss(task, names):
    """(flat_P of the chosen params, ``loss(flat_P, rows) -> B`` with the others fixed)."""
    chosen, merge = grads.partition(task.params, names)
    flat, unravel = ravel_pytree(chosen)
    return flat, lambda f, rows: task.loss(merge(unravel(f)), rows)


def hessian(task, names=None, chunk: int = 256) -> jax.Array:
    """H_PxP of the mean training loss over the chosen params (flattened as ``grads``)."""
    flat, loss = _flat_loss(task, names)
    chunk = max(1, int(chunk))
    chunks, w = curvature.chunked(task.arrays(task.train), chunk)
    return jax.jit(lambda f, c, w: curvature.hessian(loss, f, c, w, chunk))(flat, chunks, w)


def exact_fit(task, cfg):
    names = task.param_names(cfg)
    p = grads.num_params(task.params, names)
    if p > cfg.max_exact_params:
        raise ConfigError(
            f"exact_if: {p} parameters > max_exact_params={cfg.max_exact_params}; the dense "
            "P x P Hessian is only for tiny models (use kfac / ekfac, or a smaller params_filter)"
        )
    h = np.asarray(hessian(task, names, cfg.chunk), np.float64)
    return {"names": names, "lu": scipy.linalg.lu_factor(h + cfg.damping * np.eye(p))}


def exact_score(task, state, query, cfg):
    names, chunk = state["names"], max(1, int(cfg.chunk))

    def row_grads(rows):
        return grads.loss_grads(task, task.params, names, rows)

    g_QxP = jax.jit(lambda d: grads.map_rows(row_grads, d, chunk))(task.arrays(query))
    pre_PxQ = scipy.linalg.lu_solve(state["lu"], np.asarray(g_QxP, np.float64).T)
    pre_PxQ = jnp.asarray(pre_PxQ, jnp.float32)  # (H + damping I)^-1 g_q
    fn = jax.jit(lambda d, pre: grads.map_rows(lambda r: row_grads(r) @ pre, d, chunk).T)
    return methods.as_scores(fn(task.arrays(task.train), pre_PxQ))


# ---------------------------------------------------------------- K-FAC / EK-FAC


def _kfac_fit(task, cfg, eigen_correct: bool, extra=None, extra_pass: str = "factors"):
    """The fitted state; with ``extra`` (an extra accumulator for ``curvature.kron_factors``,
    ``extra_pass="factors"``, or for ``curvature.ekfac_eigenvalues``, ``"eigen"``; its
    ``xs_K`` chunked by ``cfg.chunk``) also that accumulator: (state, acc). Its step reads
    ``task.dense_io(..., with_data=True)``: the data labels' output gradients come fourth.
    The extra's initial value is donated to the pass: its arrays are deleted by the call."""
    _check_fisher(cfg)
    layers, chunk = task.dense_layers(cfg), max(1, int(cfg.chunk))
    key = jax.random.key(cfg.get("seed", 0)) if cfg.fisher == "sampled" else None
    chunks, w = curvature.chunked(task.arrays(task.train), chunk)
    if extra_pass not in ("factors", "eigen") or (extra_pass == "eigen" and not eigen_correct):
        raise ValueError(f"extra_pass {extra_pass!r}: 'factors', or 'eigen' with eigen_correct")

    init_x, step_x, xs_K = extra if extra is not None else (None, None, None)
    on_factors, on_eigen = (extra is not None and extra_pass == p for p in ("factors", "eigen"))
    factors_fn, eigen_fn = _kfac_programs(task, tuple(layers), cfg.fisher, step_x, extra_pass)
    p0 = task.params
    if on_factors:
        factors, acc = factors_fn(p0, chunks, w, key, init_x, xs_K)
    else:
        factors = factors_fn(p0, chunks, w, key)
    la, qa, ls, qs = curvature.eigenbases(factors)
    if on_eigen:
        lam, acc = eigen_fn(p0, chunks, w, qa, qs, key, init_x, xs_K)
    elif eigen_correct:
        lam = eigen_fn(p0, chunks, w, qa, qs, key)
    else:
        lam = curvature.kfac_eigenvalues(la, ls)
    lam = _damped(lam, jnp.float32(cfg.damping), bool(cfg.relative_damping))
    state = {"layers": layers, "qa": qa, "qs": qs, "lam": lam}
    return state if extra is None else (state, acc)


@functools.partial(jax.jit, static_argnums=2)
def _damped(lam, damping, relative: bool):
    """Each layer's eigenvalues plus the damping (times their mean when ``relative``): one
    program (op by op, a fresh process compiled five)."""
    return [m + damping * m.mean() if relative else m + damping for m in lam]


def _kfac_programs(task, layers: tuple, fisher: str, step_x, extra_pass: str):
    """The jitted factors and eigenvalue-correction passes (``programs.per_task``: compiled
    once per task, layers, Fisher and extra step). The parameters are their arguments, not
    constants baked into them. ``step_x`` (None: no extra accumulator) rides along the pass
    ``extra_pass`` names; it must be a module-level function (it is part of the key)."""

    def io(params, with_data=False):
        return lambda rows, k: task.dense_io(params, rows, layers, fisher, k, with_data=with_data)

    def factors_pass():
        shapes = dense_shapes(task, layers)
        if step_x is not None and extra_pass == "factors":
            return lambda p, c, w, k, i, x: curvature.kron_factors(
                io(p, True), c, w, k, (i, step_x, x), shapes
            )
        return lambda p, c, w, k: curvature.kron_factors(io(p), c, w, k, shapes=shapes)

    def eigen_pass():
        if step_x is not None and extra_pass == "eigen":
            return lambda p, c, w, a, s, k, i, x: curvature.ekfac_eigenvalues(
                io(p, True), c, w, a, s, k, (i, step_x, x)
            )
        return lambda p, c, w, a, s, k: curvature.ekfac_eigenvalues(io(p), c, w, a, s, k)

    on = extra_pass if step_x is not None else None
    key = ("kfac", layers, fisher, step_x, on)
    # The extra accumulator's initial value is donated: the pass's carry takes over its
    # buffer instead of allocating its own. STRIDE's T subset sums are T x P (0.5 GB at
    # T = N on lm_shakespeare); without it a fit held them twice, and freshly mapped memory
    # is slow to touch (about 1.8 s per GB on the 2-core sandbox, BENCHMARKS.md session 14).
    donate = {"factors": dict(donate_argnums=4), "eigen": dict(donate_argnums=6)}
    factors = programs.per_task(
        task, key + ("factors",), factors_pass, **donate["factors"] if on == "factors" else {}
    )
    eigen = programs.per_task(
        task, key + ("eigen",), eigen_pass, **donate["eigen"] if on == "eigen" else {}
    )
    return factors, eigen


def dense_shapes(task, layers: tuple) -> list[tuple[int, int]]:
    """[(I_l, O_l)]: the widths of ``task.dense_io``'s inputs and output gradients per layer
    (a classifier's inputs count the bias's constant 1), traced once per task and layers."""

    def trace():
        one = jax.tree.map(lambda a: a[:1], task.arrays(task.train))
        return curvature.io_shapes(lambda r, k: task.dense_io(task.params, r, layers, key=k), one)

    return programs.memo(task, ("dense_shapes", tuple(layers)), trace)


def kfac_fit(task, cfg):
    return _kfac_fit(task, cfg, eigen_correct=False)


def ekfac_fit(task, cfg):
    return _kfac_fit(task, cfg, eigen_correct=True)


def kfac_score(task, state, query, cfg):
    """scores_QxN = sum over layers of <(F + lam)^-1 G_q, G_i>: query gradients
    preconditioned once (Q x I x O per layer), training rows ``chunk`` at a time."""
    layers, chunk = tuple(state["layers"]), max(1, int(cfg.chunk))
    key = ("kfac_score", layers, chunk)
    fn = programs.per_task(task, key, lambda: _score_pass(task, layers, chunk))
    train, q = task.arrays(task.train), task.arrays(query)
    num_q = grads.num_rows(q)
    num_params = sum(m.size for m in state["lam"])  # one eigenvalue per kernel entry
    block = query_block(num_q, num_params)
    fitted = state["qa"], state["qs"], state["lam"]
    if block >= num_q:  # the usual case: one call, nothing padded or sliced
        return methods.as_scores(fn(task.params, train, q, *fitted))
    logging.info(
        "kfac/ekfac scoring: %d queries in blocks of %d (Q x %d preconditioned gradients "
        "would not fit in memory); the training rows are read once per block",
        num_q,
        block,
        num_params,
    )
    blocks = grads.padded_chunks(q, block)  # one shape for every block: one program
    out = [
        fn(task.params, train, jax.tree.map(lambda a, k=k: a[k], blocks), *fitted)
        for k in range(-(-num_q // block))
    ]
    return methods.as_scores(jnp.concatenate(out)[:num_q])


_QUERY_BYTES = 4 << 30  # the queries' preconditioned gradients held at once, at most


def query_block(num_queries: int, num_params: int) -> int:
    """Queries per block of ``kfac_score``: all of them when their gradients and
    preconditioned gradients (2 x Q x P float32) fit in ``_QUERY_BYTES`` and in half the
    memory ``resources.available_bytes`` reports, else as many as fit (at least 1). On
    SmolLM2-135M's 30 MLPs (P = 79.6M) 64 queries would need 41 GB at once."""
    from stride_jax import resources

    budget = min(_QUERY_BYTES, resources.available_bytes() // 2)
    return max(1, min(num_queries, budget // (8 * max(1, num_params))))


def _score_pass(task, layers: tuple, chunk: int):
    def row_grads(params, rows):
        a_L, _, [(_, g_L)] = task.dense_io(params, rows, layers, "empirical")
        return [curvature.row_grads(a, g) for a, g in zip(a_L, g_L, strict=True)]

    def dots(params, rows, pre):
        a_L, _, [(_, g_L)] = task.dense_io(params, rows, layers, "empirical")
        return curvature.dense_dots(a_L, g_L, pre)

    def fn(params, train, q, qa, qs, lam):
        g_q = grads.map_rows(lambda r: row_grads(params, r), q, chunk)
        pre = curvature.precondition(qa, qs, lam, g_q)
        return grads.map_rows(lambda r: dots(params, r, pre), train, chunk).T

    return fn


def _defaults(name):
    return lambda kind: default_config(name, kind)


methods.register(
    "exact_if", exact_fit, exact_score, default_config=_defaults("exact_if"), kinds=("classifier",)
)
methods.register("kfac", kfac_fit, kfac_score, default_config=_defaults("kfac"))
methods.register("ekfac", ekfac_fit, kfac_score, default_config=_defaults("ekfac"))
