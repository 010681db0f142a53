"""Gradient attribution for language models: GradDot, TracIn, TRAK and LoGRA.

Every method differentiates the per-row loss (``lm_train.example_losses``: mean CE over the
row's target tokens) with respect to a chosen subset of the decoder's parameters, the others
held fixed. By default that subset is the MLP of the last ``layers`` blocks; ``params_filter``
(a regex searched in parameter paths such as ``"layers/1/mlp/fc/kernel"``) overrides it.
Training rows are processed ``chunk`` at a time (``lax.map``), so memory stays at chunk x P.
A positive score means a gradient step on training row i lowers the query's loss (helps).
Registered names and their other config keys (``default_config(name)``):

- ``"graddot"``: grad L(q) . grad L(i).
- ``"tracin"``: sum_c lr_c grad L(q; theta_c) . grad L(i; theta_c) over ``num_checkpoints``
  checkpoints of the base model's own trajectory (the recipe replayed in segments with
  ``lm_train.run_steps``; the last must equal ``task.params`` within ``replay_atol``); lr_c is
  the mean scheduled learning rate over the segment ending at theta_c.
- ``"trak"`` / ``"trak1"`` (``num_models`` 4 / 1): phi = R^T grad L with R a Gaussian P x
  ``proj_dim`` matrix generated on device block by block (``trak.projection``), kept whole
  if it takes at most ``max_proj_bytes``, else regenerated per chunk (``proj_dim=0``: no
  projection); score = phi_q^T (Phi^T Phi + lam I)^-1 phi_i,
  averaged over models (model 0 = base, model m retrained from ``key(seed + m)``).
- ``"logra"``: LoGRA (Choe et al. 2024) on the chosen dense kernels W (in x out): the per-row
  gradient G = sum_t x_t g_t^T is projected to P_in^T G P_out = (X P_in)^T (G_out P_out) from
  the token-level layer inputs x_t and output gradients g_t, never forming G. P_in, P_out have
  ``rank_in`` / ``rank_out`` columns, Gaussian (``init="random"``) or the top eigenvectors of
  the training E[x x^T] / E[g g^T] (``init="pca"``); scored like TRAK with one model.

``damping`` is relative, as in LoGRA: lam = damping x the mean eigenvalue of Phi^T Phi (trace
/ K); the kernel is solved in float64 (``trak._kernel_weighted``).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from stride_jax.baselines import base, trak
from stride_jax.models import lm_train, mlp

_COMMON = dict(layers=1, params_filter="", chunk=16)
_TRAK = dict(proj_dim=2048, damping=0.1, seed=100, max_proj_bytes=2**30)
DEFAULTS = {
    "graddot": dict(_COMMON),
    "tracin": dict(_COMMON, num_checkpoints=5, replay_atol=1e-4),
    "trak": dict(_COMMON, **_TRAK, num_models=4),
    "trak1": dict(_COMMON, **_TRAK, num_models=1),
    "logra": dict(_COMMON, rank_in=16, rank_out=16, init="random", damping=0.1, seed=0),
}
_HI = jax.lax.Precision.HIGHEST


def default_config(name: str) -> ml_collections.ConfigDict:
    """The default config block of one of this module's methods (see module docstring)."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown LM gradient baseline {name!r}; known: {sorted(DEFAULTS)}")
    return ml_collections.ConfigDict(DEFAULTS[name])


# --- parameter subsets and chunked rows ------------------------------------------------------


def _path_str(path) -> str:
    keys = [k for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def param_names(task, cfg) -> tuple[str, ...]:
    """Paths of the chosen parameters (e.g. ``"layers/1/mlp/fc/kernel"``), in tree order."""
    n = task.model_config.n_layers
    if not cfg.params_filter and not 1 <= cfg.layers <= n:
        raise ValueError(f"layers must be in 1..{n} (the model's depth), got {cfg.layers}")
    last = "|".join(str(i) for i in range(n - cfg.layers, n))
    pattern = cfg.params_filter or rf"^layers/({last})/mlp/"
    names = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(task.params)[0]]
    chosen = tuple(s for s in names if re.search(pattern, s))
    if not chosen:
        raise ValueError(f"params_filter {pattern!r} matches no parameter path, e.g. {names[:3]}")
    return chosen


def partition(params, names):
    """(chosen ``{path: leaf}``, ``merge``: chosen leaves -> full params, the rest fixed)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    pairs = [(_path_str(p), v) for p, v in flat]
    chosen = {k: v for k, v in pairs if k in names}

    def merge(new):
        return jax.tree_util.tree_unflatten(treedef, [new.get(k, v) for k, v in pairs])

    return chosen, merge


def num_params(params, names) -> int:
    return sum(int(np.prod(v.shape)) for v in partition(params, names)[0].values())


def padded_chunks(data: dict, chunk: int) -> dict:
    """Rows reshaped to (num_chunks, chunk, L); zero rows (no real token) pad the end."""
    n = data["tokens"].shape[0]
    chunk = max(1, min(int(chunk), n))
    pad = -n % chunk

    def fold(a):
        a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape(-1, chunk, *a.shape[1:])

    return jax.tree.map(fold, data)


def map_rows(fn, data: dict, chunk: int):
    """``fn(rows of one chunk) -> chunk x ...`` over all N rows (``lax.map``), padding dropped."""
    n = data["tokens"].shape[0]
    out = jax.lax.map(fn, padded_chunks(data, chunk))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


def row_grads(graphdef, params, names, rows: dict) -> jax.Array:
    """g_BxP: per-row loss gradients w.r.t. the chosen params (``vmap(grad)``), flattened."""
    chosen, merge = partition(params, names)

    def loss(c, t, a, m):
        return lm_train.example_losses(graphdef, merge(c), t[None], a[None], m[None])[0]

    def one(t, a, m):
        return ravel_pytree(jax.grad(loss)(chosen, t, a, m))[0]

    return jax.vmap(one)(rows["tokens"], rows["attn"], rows["loss_mask"])


# --- GradDot and TracIn --------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "names", "chunk"))
def graddot_scores(graphdef, params, names, train: dict, query: dict, chunk: int):
    """scores_QxN = g_q . g_i, training rows in chunks."""
    g_QxP = map_rows(lambda r: row_grads(graphdef, params, names, r), query, chunk)

    def dots(rows):
        return jnp.matmul(row_grads(graphdef, params, names, rows), g_QxP.T, precision=_HI)

    return map_rows(dots, train, chunk).T


def schedule(recipe):
    """The learning-rate schedule of ``lm_train.make_optimizer`` (update t uses schedule(t))."""
    return optax.warmup_cosine_decay_schedule(
        0.0,
        recipe.lr,
        max(recipe.warmup_steps, 1),
        max(recipe.steps, recipe.warmup_steps + 1),
        recipe.lr * recipe.lr_end_frac,
    )


def trajectory(task, num_checkpoints: int, atol: float):
    """(checkpoints [params], lr_C): the base recipe replayed in C segments from ``params0``."""
    recipe = task.recipe
    ends_C = mlp.checkpoint_steps(recipe.steps, num_checkpoints)
    run = jax.jit(
        lambda s, d, w, k, n: lm_train.run_steps(recipe, task.graphdef, s, k, d, w, n)[0],
        static_argnums=4,
    )
    state = {**lm_train.init_state(recipe, task.params0), "step": jnp.int32(0)}
    data, w, key = task.data(), jnp.ones(len(task.train)), jax.random.key(task.seed)
    ckpts, start = [], 0
    for end in ends_C:
        state = run(state, data, w, key, int(end - start))
        ckpts.append(state["params"])
        start = int(end)
    leaves = zip(jax.tree.leaves(ckpts[-1]), jax.tree.leaves(task.params), strict=True)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves)
    if gap > atol:
        raise ValueError(
            f"TracIn: replaying the recipe from params0 with key(seed={task.seed}) does not "
            f"reproduce the task's params (max |diff| {gap:.2e} > replay_atol={atol:.0e})"
        )
    lr_T = np.asarray(schedule(recipe)(np.arange(recipe.steps)), np.float64)
    lr_C = [lr_T[a:b].mean() for a, b in zip([0, *ends_C[:-1]], ends_C, strict=True)]
    return ckpts, np.asarray(lr_C)


def _graddot_fit(task, cfg):
    return {"ckpts": [task.params], "lr_C": np.ones(1)}


def _tracin_fit(task, cfg):
    ckpts, lr_C = trajectory(task, int(cfg.num_checkpoints), float(cfg.replay_atol))
    return {"ckpts": ckpts, "lr_C": lr_C}


def _tracin_score(task, state, query, cfg):
    """sum_c lr_c graddot(theta_c) (GradDot: the base model alone, lr 1)."""
    names, train, q = param_names(task, cfg), task.data(), task.data(query)
    total = sum(
        lr * graddot_scores(task.graphdef, p, names, train, q, cfg.chunk)
        for p, lr in zip(state["ckpts"], state["lr_C"], strict=True)
    )
    return base.as_scores(total)


# --- TRAK ----------------------------------------------------------------------------------


def project(g_P: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """g_P @ R (R = ``trak.projection(key, P, k)``), R regenerated ROWS rows at a time."""
    rows = trak.ROWS
    nblocks = -(-g_P.shape[0] // rows)
    g_RxB = jnp.pad(g_P, (0, nblocks * rows - g_P.shape[0])).reshape(nblocks, rows)

    def body(acc_K, r):
        return acc_K + jnp.matmul(g_RxB[r], trak.projection_block(key, r, k), precision=_HI), None

    return jax.lax.scan(body, jnp.zeros(k, g_P.dtype), jnp.arange(nblocks))[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "names", "k", "chunk", "dense"))
def trak_features(graphdef, params, names, proj_key, data: dict, k: int, chunk: int, dense: bool):
    """phi_NxK: projected per-row loss gradients (k = 0: the raw gradients, K = P). ``dense``
    builds R once (P x K in memory); otherwise every chunk regenerates it block by block."""
    proj_PxK = trak.projection(proj_key, num_params(params, names), k) if dense and k else None

    def feats(rows):
        g_BxP = row_grads(graphdef, params, names, rows)
        if k == 0:
            return g_BxP
        if proj_PxK is not None:
            return jnp.matmul(g_BxP, proj_PxK, precision=_HI)
        return jax.vmap(lambda g: project(g, proj_key, k))(g_BxP)

    return map_rows(feats, data, chunk)


def _trak_phi(task, params, proj_key, data, cfg) -> jax.Array:
    names = param_names(task, cfg)
    dense = 4 * cfg.proj_dim * num_params(task.params, names) <= cfg.max_proj_bytes
    return trak_features(
        task.graphdef, params, names, proj_key, data, cfg.proj_dim, cfg.chunk, dense
    )


def kernel_weights(phi_NxK: jax.Array, damping: float) -> jax.Array:
    """W_NxK = Phi (Phi^T Phi + lam I)^-1 with lam = damping x trace(Phi^T Phi) / K (float64)."""
    phi64 = np.asarray(phi_NxK, np.float64)
    lam = float(damping) * float(np.sum(phi64**2)) / phi64.shape[1]
    if lam <= 0:
        raise ValueError(f"damping must be > 0 and the gradients nonzero (lam = {lam})")
    with jax.enable_x64(True):
        zeros = jnp.zeros(phi_NxK.shape[0], jnp.float32)
        return trak._kernel_weighted(phi_NxK, zeros, jnp.float64(lam))


def _trak_fit(task, cfg):
    states = []
    for m in range(int(cfg.num_models)):
        params = task.params if m == 0 else task.retrain(jax.random.key(cfg.seed + m))
        key = trak.projection_key(cfg, m)
        w_NxK = kernel_weights(_trak_phi(task, params, key, task.data(), cfg), cfg.damping)
        states.append({"params": params, "proj_key": key, "w_NxK": w_NxK})
    return states


def _trak_score(task, states, query, cfg):
    total = 0.0
    for s in states:
        phi_QxK = _trak_phi(task, s["params"], s["proj_key"], task.data(query), cfg)
        total = total + jnp.matmul(phi_QxK, s["w_NxK"].T, precision=_HI)
    return base.as_scores(total / len(states))


# --- LoGRA: token-level inputs and output gradients of dense layers --------------------------


def kernel_paths(names) -> tuple[str, ...]:
    """Module paths (``"layers/1/mlp/fc"``) of the chosen dense kernels."""
    paths = tuple(n.removesuffix("/kernel") for n in names if n.endswith("/kernel"))
    if not paths:
        raise ValueError(f"no dense kernel among the chosen parameters {names[:4]}")
    return paths


class _Tap(nnx.Module):
    """A dense layer whose input is kept (``x``) and whose output gets ``eps`` added."""

    def __init__(self, linear, eps):
        self.linear, self.eps = linear, nnx.Intermediate(eps)

    def __call__(self, x):
        self.x = nnx.Intermediate(x)
        return self.linear(x) + self.eps[...]


def _kernel_shape(params, path: str):
    """(in, out) of the dense kernel at ``path``."""
    return partition(params, (path + "/kernel",))[0][path + "/kernel"].shape


def layer_io(graphdef, params, paths, rows: dict, key=None):
    """[(x_BxLxI inputs, g_BxLxO output gradients)] of the dense layers at ``paths``.

    g is the gradient of the row's mean target CE (``lm_train.example_losses``) w.r.t. the
    layer output, so the row's kernel gradient is ``x^T g``; with ``key``, the targets are
    sampled from the model's own predictive distribution instead of the data (true Fisher).
    """
    tokens, B, L = rows["tokens"], *rows["tokens"].shape
    eps0 = [jnp.zeros((B, L, _kernel_shape(params, p)[1])) for p in paths]

    def loss(eps):
        model, taps = nnx.merge(graphdef, params), []
        for path, e in zip(paths, eps, strict=True):
            *parents, name = path.split("/")
            owner = model
            for part in parents:
                owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
            taps.append(_Tap(getattr(owner, name), e))
            setattr(owner, name, taps[-1])
        logits = model(tokens, rows["attn"])[:, :-1]
        targets = tokens[:, 1:]
        if key is not None:
            targets = jax.random.categorical(key, jax.lax.stop_gradient(logits))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        w = rows["loss_mask"][:, 1:]
        row_loss = (ce * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)
        return row_loss.sum(), [t.x[...] for t in taps]

    g, xs = jax.grad(loss, has_aux=True)(eps0)
    return list(zip(xs, g, strict=True))


@functools.partial(jax.jit, static_argnames=("graphdef", "paths", "chunk"))
def covariances(graphdef, params, paths, data: dict, chunk: int, key=None):
    """[(A_IxI, S_OxO)]: token-level E[x x^T] over real tokens and E[g g^T] per real token."""
    chunks = padded_chunks(data, chunk)
    n_tok = data["attn"].sum()

    def body(acc, xs):
        rows, c = xs
        k = None if key is None else jax.random.fold_in(key, c)
        io = layer_io(graphdef, params, paths, rows, k)
        m = rows["attn"][..., None].astype(jnp.float32)
        return [
            (a + jnp.einsum("bti,btj->ij", x * m, x), s + jnp.einsum("bto,btp->op", g, g))
            for (a, s), (x, g) in zip(acc, io, strict=True)
        ], None

    init = [
        (jnp.zeros((i, i)), jnp.zeros((o, o))) for i, o in (_kernel_shape(params, p) for p in paths)
    ]
    nc = chunks["tokens"].shape[0]
    acc, _ = jax.lax.scan(body, init, (chunks, jnp.arange(nc)))
    return [(a / n_tok, s / n_tok) for a, s in acc]


@functools.partial(jax.jit, static_argnames=("graphdef", "paths", "chunk"))
def logra_features(graphdef, params, paths, projs, data: dict, chunk: int):
    """phi_NxK: per layer vec((X P_in)^T (G P_out)) (r_in x r_out), layers concatenated."""

    def feats(rows):
        io = layer_io(graphdef, params, paths, rows)
        out = [
            jnp.einsum("bti,bto->bio", x @ p_in, g @ p_out, precision=_HI).reshape(x.shape[0], -1)
            for (x, g), (p_in, p_out) in zip(io, projs, strict=True)
        ]
        return jnp.concatenate(out, axis=1)

    return map_rows(feats, data, chunk)


def logra_projections(task, paths, cfg):
    """[(P_in IxR, P_out OxR')] per layer: Gaussian / sqrt(r), or the top PCA directions."""
    if cfg.init == "pca":
        covs = covariances(task.graphdef, task.params, paths, task.data(), cfg.chunk, None)
        top = [jnp.linalg.eigh(c)[1][:, ::-1] for pair in covs for c in pair]
        ranks = [cfg.rank_in, cfg.rank_out] * len(paths)
        mats = [v[:, :r] for v, r in zip(top, ranks, strict=True)]
        return list(zip(mats[::2], mats[1::2], strict=True))
    if cfg.init != "random":
        raise ValueError(f"logra init must be 'random' or 'pca', got {cfg.init!r}")
    key, out = jax.random.key(cfg.seed), []
    for i, path in enumerate(paths):
        d_in, d_out = _kernel_shape(task.params, path)
        k_in, k_out = jax.random.split(jax.random.fold_in(key, i))
        p_in = jax.random.normal(k_in, (d_in, cfg.rank_in)) / np.sqrt(cfg.rank_in)
        out.append((p_in, jax.random.normal(k_out, (d_out, cfg.rank_out)) / np.sqrt(cfg.rank_out)))
    return out


def _logra_fit(task, cfg):
    paths = kernel_paths(param_names(task, cfg))
    projs = logra_projections(task, paths, cfg)
    phi = logra_features(task.graphdef, task.params, paths, projs, task.data(), cfg.chunk)
    return {"paths": paths, "projs": projs, "w_NxK": kernel_weights(phi, cfg.damping)}


def _logra_score(task, state, query, cfg):
    phi_QxK = logra_features(
        task.graphdef, task.params, state["paths"], state["projs"], task.data(query), cfg.chunk
    )
    return base.as_scores(jnp.matmul(phi_QxK, state["w_NxK"].T, precision=_HI))


base.register_lm("graddot", _graddot_fit, _tracin_score)
base.register_lm("tracin", _tracin_fit, _tracin_score)
base.register_lm("trak", _trak_fit, _trak_score)
base.register_lm("trak1", _trak_fit, _trak_score)
base.register_lm("logra", _logra_fit, _logra_score)
