"""Gradient attribution, each method once for every task kind: GradDot, GradCos, TracIn,
TRAK (TRAK-1) and LoGRA.

Every method differentiates a per-row function of the task (``task.loss``; TRAK:
``task.output``'s f) w.r.t. the parameters ``task.param_names(cfg)`` (the classifier: all of
them, in ``ravel_pytree`` order; the decoder: the MLPs of the last ``layers`` blocks, or the
regex ``params_filter``), the others held fixed (``stride_jax.func.grads``). Training rows
are processed ``chunk`` at a time, so memory stays at chunk x P. A positive score means a
gradient step on training row i lowers the query's loss (helps).

- ``graddot``: grad L(q) . grad L(i); ``gradcos``: the same between unit gradients.
- ``tracin`` (TracIn-CP, Pruthi et al. 2020): sum_c lr_c graddot(theta_c) over
  ``num_checkpoints`` checkpoints of the base model's own trajectory (``task.trajectory``:
  the recipe replayed; its last checkpoint must equal ``task.params`` within
  ``replay_atol``, 1e-4 by default); lr_c is the mean scheduled learning rate over the
  segment ending at theta_c. AdamW's preconditioning is ignored, as in TracIn.
- ``trak`` / ``trak1`` (Park et al. 2023; ``num_models`` models, model 0 the task's base
  params, model m retrained from ``key(seed + m)``): phi = R^T grad f with R Gaussian
  P x ``proj_dim`` (``stride_jax.func.projections``; kept whole if it takes at most
  ``max_proj_bytes``, unset = always, else regenerated per row; ``proj_dim=0``: no
  projection); score = phi_q^T (Phi^T Phi + lam I)^-1 phi_i w_i with f, w the task's output
  and reweighting (the classifier's margin and 1 - p; the decoder's -loss and 1). lam is
  ``damping`` (``damping_mode="absolute"``, TRAK's ridge) or damping x trace / K
  (``"relative"``). The ensemble averages per-model score matrices.
- ``logra`` (Choe et al. 2024) on the task's dense layers (``task.dense_layers(cfg)``: the
  decoder's chosen kernels; the classifier's chosen ``nnx.Linear`` layers, bias folded in as
  an input column of ones): the per-row kernel gradient G = sum_t a_t g_t^T
  (``task.dense_io``) is projected to (A P_in)^T (G_out P_out), never forming G; P_in, P_out
  have ``rank_in`` / ``rank_out`` columns, Gaussian (``init="random"``) or the top
  eigenvectors of E[a a^T] / E[g g^T] (``init="pca"``); scored like TRAK with one model and
  relative damping.

Defaults differ by kind (``default_config(kind)``, tuned per benchmark): the classifier's TRAK
was chosen on digits' validation queries (TRAK-1 LDS 0.12 at damping 1e-3, 0.61 at 100, 0.64
at 300, 0.61 at 1e3, 0.28 at 1e7; the Gram's eigenvalues span ~7e-4 to 7e4).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stride_jax import methods
from stride_jax.errors import ConfigError
from stride_jax.func import curvature, grads, programs, projections
from stride_jax.resources import Progress

HIGHEST = jax.lax.Precision.HIGHEST

_CLS = dict(chunk=256)
_DEC = dict(layers=1, params_filter="", chunk=16)
_CLS_TRAK = dict(_CLS, proj_dim=2048, damping=300.0, damping_mode="absolute", seed=100)
_DEC_TRAK = dict(
    _DEC, proj_dim=2048, damping=0.1, damping_mode="relative", seed=100, max_proj_bytes=2**30
)
DEFAULTS = {
    "graddot": {"classifier": _CLS, "decoder": _DEC},
    "gradcos": {"classifier": _CLS, "decoder": _DEC},
    "tracin": {
        "classifier": dict(_CLS, num_checkpoints=5),
        "decoder": dict(_DEC, num_checkpoints=5, replay_atol=1e-4),
    },
    "trak": {
        "classifier": dict(_CLS_TRAK, num_models=10),
        "decoder": dict(_DEC_TRAK, num_models=4),
    },
    "trak1": {
        "classifier": dict(_CLS_TRAK, num_models=1),
        "decoder": dict(_DEC_TRAK, num_models=1),
    },
    "logra": {
        "classifier": dict(_CLS, rank_in=16, rank_out=16, init="random", damping=0.1, seed=0),
        "decoder": dict(_DEC, rank_in=16, rank_out=16, init="random", damping=0.1, seed=0),
    },
}


def default_config(name: str, kind: str) -> ml_collections.ConfigDict:
    """The default config block of method ``name`` for task ``kind`` (see the module doc)."""
    if kind not in DEFAULTS[name]:
        raise ConfigError(f"method {name!r} has no defaults for {kind} tasks")
    return ml_collections.ConfigDict(dict(DEFAULTS[name][kind]))


# --- GradDot, GradCos and TracIn: sums of lr_c x gradient dots at checkpoints -----------------


def _base_fit(task, cfg):
    """GradDot / GradCos: the base model alone, weight 1."""
    return {"ckpts": [task.params], "lr_C": np.ones(1)}


def _tracin_fit(task, cfg):
    ckpts, lr_C = task.trajectory(int(cfg.num_checkpoints))
    atol = float(cfg.get("replay_atol", 1e-4))
    leaves = zip(jax.tree.leaves(ckpts[-1]), jax.tree.leaves(task.params), strict=True)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves)
    if gap > atol:
        raise ConfigError(
            f"TracIn: replaying the task's recipe does not reproduce the task's params "
            f"(max |diff| {gap:.2e} > replay_atol={atol:.0e}); the trajectory would be "
            "another model's"
        )
    return {"ckpts": ckpts, "lr_C": lr_C}


def _dot_score(normalize: bool):
    def score(task, state, query, cfg):
        """sum_c lr_c g_q(theta_c) . g_i(theta_c) (unit gradients when ``normalize``)."""
        names, chunk = task.param_names(cfg), int(cfg.chunk)

        def build():
            return lambda p, tr, q: grads.dot_scores(task, p, names, tr, q, chunk, normalize)

        fn = programs.per_task(task, ("dot_scores", names, chunk, normalize), build)
        train, q = task.arrays(task.train), task.arrays(query)
        total = 0.0
        for params, lr in zip(state["ckpts"], state["lr_C"], strict=True):
            total = total + lr * fn(params, train, q)
        return methods.as_scores(total)

    return score


# --- TRAK ------------------------------------------------------------------------------------


def trak_features(task, names, k: int, chunk: int, dense: bool):
    """Jitted ``(params, proj_key, data) -> (phi_NxK, w_N)``: projected per-row output
    gradients (k = 0: the raw gradients, K = P) and the output's reweighting. ``dense``
    builds R once (P x K in memory); otherwise every row regenerates it block by block.
    Kept per task (``programs.per_task``): fit, score and a later call share it."""
    key = ("trak_features", names, int(k), int(chunk), bool(dense))
    return programs.per_task(task, key, lambda: _trak_run(task, names, k, chunk, dense))


def _trak_run(task, names, k: int, chunk: int, dense: bool):
    def run(params, proj_key, data):
        p = grads.num_params(params, names)
        proj_PxK = projections.projection(proj_key, p, k) if dense and k else None

        def feats(rows):
            g_BxP = grads.output_grads(task, params, names, rows)
            w_B = task.output(params, rows)[1]
            if k == 0:
                return g_BxP, w_B
            if proj_PxK is not None:
                return jnp.matmul(g_BxP, proj_PxK, precision=HIGHEST), w_B
            return jax.vmap(lambda g: projections.project(g, proj_key, k))(g_BxP), w_B

        return grads.map_rows(feats, data, chunk)

    return run


def _trak_featurizer(task, cfg):
    names, k = task.param_names(cfg), int(cfg.proj_dim)
    limit = cfg.get("max_proj_bytes", None)
    dense = limit is None or 4 * k * grads.num_params(task.params, names) <= limit
    return trak_features(task, names, k, int(cfg.chunk), dense)


def _trak_fit(task, cfg):
    feats, data, states = _trak_featurizer(task, cfg), task.arrays(task.train), []
    num_models = int(cfg.num_models)
    progress = Progress("trak: models (retrain + features)", num_models)
    for m in range(num_models):
        params = task.params if m == 0 else task.retrain(jax.random.key(cfg.seed + m))
        key = projections.projection_key(int(cfg.seed), m)
        phi_NxK, w_N = feats(params, key, data)
        w_NxK = projections.kernel_weights(phi_NxK, w_N, cfg.damping, cfg.damping_mode)
        states.append({"params": params, "proj_key": key, "w_NxK": w_NxK})
        if num_models > 1:
            progress.update(m + 1)
    return states


def _trak_score(task, states, query, cfg):
    feats, q, total = _trak_featurizer(task, cfg), task.arrays(query), 0.0
    for s in states:
        phi_QxK, _ = feats(s["params"], s["proj_key"], q)
        total = total + jnp.matmul(phi_QxK, s["w_NxK"].T, precision=HIGHEST)
    return methods.as_scores(total / len(states))


# --- LoGRA -----------------------------------------------------------------------------------


def logra_features(task, layers, chunk: int):
    """Jitted ``(params, projs, data) -> phi_NxK``: per dense layer vec((A P_in)^T (G P_out))
    (r_in x r_out) from the task's token-level inputs A and output gradients G
    (``task.dense_io``), layers concatenated. Kept per task (``programs.per_task``)."""
    layers, chunk = tuple(layers), int(chunk)
    return programs.per_task(
        task, ("logra_features", layers, chunk), lambda: _logra_run(task, layers, chunk)
    )


def _logra_run(task, layers, chunk: int):
    def run(params, projs, data):
        def feats(rows):
            a_L, _, terms = task.dense_io(params, rows, layers)
            out = [
                jnp.einsum("bti,bto->bio", a @ p_in, g @ p_out, precision=HIGHEST).reshape(
                    a.shape[0], -1
                )
                for a, g, (p_in, p_out) in zip(a_L, terms[0][1], projs, strict=True)
            ]
            return jnp.concatenate(out, axis=1)

        return grads.map_rows(feats, data, chunk)

    return run


def logra_projections(task, layers, cfg):
    """[(P_in IxR, P_out OxR')] per layer: Gaussian / sqrt(r), or the top PCA directions of
    E[a a^T] and E[g g^T] (``curvature.kron_factors`` with the data's targets)."""
    data, chunk = task.arrays(task.train), int(cfg.chunk)

    def io_at(params):
        return lambda rows, key: task.dense_io(params, rows, layers, "empirical", key)

    io = io_at(task.params)
    if cfg.init == "pca":
        chunks, w = curvature.chunked(data, chunk)

        # The parameters are an argument, not constants baked into the program.
        def build():
            return lambda p, c, w: curvature.kron_factors(io_at(p), c, w)

        fn = programs.per_task(task, ("logra_pca", tuple(layers)), build)
        covs = fn(task.params, chunks, w)
        top = [jnp.linalg.eigh(c)[1][:, ::-1] for pair in covs for c in pair]
        ranks = [cfg.rank_in, cfg.rank_out] * len(layers)
        mats = [v[:, :r] for v, r in zip(top, ranks, strict=True)]
        return list(zip(mats[::2], mats[1::2], strict=True))
    if cfg.init != "random":
        raise ConfigError(f"logra init must be 'random' or 'pca', got {cfg.init!r}")
    one_row = jax.tree.map(lambda a: a[:1], data)
    a_L, _, terms = jax.eval_shape(io, one_row, None)
    key, out = jax.random.key(cfg.seed), []
    for i, (a, g) in enumerate(zip(a_L, terms[0][1], strict=True)):
        d_in, d_out = a.shape[-1], g.shape[-1]
        k_in, k_out = jax.random.split(jax.random.fold_in(key, i))
        p_in = jax.random.normal(k_in, (d_in, cfg.rank_in)) / np.sqrt(cfg.rank_in)
        out.append((p_in, jax.random.normal(k_out, (d_out, cfg.rank_out)) / np.sqrt(cfg.rank_out)))
    return out


def _logra_fit(task, cfg):
    layers = task.dense_layers(cfg)
    projs = logra_projections(task, layers, cfg)
    phi = logra_features(task, layers, int(cfg.chunk))(task.params, projs, task.arrays(task.train))
    ones_N = jnp.ones(phi.shape[0], jnp.float32)
    w_NxK = projections.kernel_weights(phi, ones_N, cfg.damping, "relative")
    return {"layers": layers, "projs": projs, "w_NxK": w_NxK}


def _logra_score(task, state, query, cfg):
    feats = logra_features(task, state["layers"], int(cfg.chunk))
    phi_QxK = feats(task.params, state["projs"], task.arrays(query))
    return methods.as_scores(jnp.matmul(phi_QxK, state["w_NxK"].T, precision=HIGHEST))


def _register() -> None:
    impls = {
        "graddot": (_base_fit, _dot_score(False)),
        "gradcos": (_base_fit, _dot_score(True)),
        "tracin": (_tracin_fit, _dot_score(False)),
        "trak": (_trak_fit, _trak_score),
        "trak1": (_trak_fit, _trak_score),
        "logra": (_logra_fit, _logra_score),
    }
    for name, (fit, score) in impls.items():
        methods.register(
            name,
            fit,
            score,
            default_config=functools.partial(default_config, name),
            kinds=tuple(DEFAULTS[name]),
        )


_register()
