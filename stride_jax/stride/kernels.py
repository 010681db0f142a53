"""Kernel operators: STRIDE's operators on the model's dense kernels (``stride.hook="kernels"``).

Operator k steers each dense layer l that ``task.dense_layers`` lists (a decoder's MLP ``fc``
and ``proj`` kernels of its last ``kernels.layers`` blocks, 0 meaning all that fit in memory
(``kernel_site``); every ``nnx.Linear`` of a classifier; ``kernels.params_filter`` narrows
either) by adding ``x_t B_k^l`` to the layer's output at every token t, with x_t the layer's
own input. This is
the paper's operator ``B_k phi(h)`` with the layer's input as the (frozen, full-rank) basis
phi, written where the layer writes; its gates B_k^l (I_l x O_l) live in the kernel's own
space, so the operator space is the parameter space that EK-FAC attributes in.

Stage 1 is the closed-form Gauss-Newton step of ``newton`` (the decoder and classifier
recipe), ``B_k = -w_f ((w_f + w_s) F + gate_l2 I)^-1 g_k``, with g_k the mean fidelity
gradient of subset k's members at zero gates and F the Gauss-Newton matrix (true Fisher) of
the stability KL at the base model. F has P = sum_l I_l O_l rows (65,536 on lm_shakespeare's
two MLPs), too many for ``newton``'s dense factorisation, so it is block-diagonal over layers
and Kronecker-factored with eigenvalue correction (EK-FAC, George et al. 2018;
``func.curvature``), from labels sampled from the base model (``kernels.fisher="empirical"``:
the data's labels; ``kernels.curvature="kfac"``: no eigenvalue correction). The damping
``gate_l2 / (w_f + w_s)`` is relative to each layer's mean corrected eigenvalue (as the EK-FAC
baseline's ``relative_damping``): layers' curvatures differ by orders of magnitude. At full
rank the subset sums of the members' gradients are accumulated in the Kronecker factors' own
pass over the training rows (``fused_fit``): stage 1 reads the training rows twice (once
under "kfac").

Responses are first order (``responses="linear"``): ``y_k(q) = -<G_q, B_k>`` summed over the
layers, from one gradient per query row. The steered forward pass and Adam steps are not
implemented for this site (refused). ``kernels.rank`` restricts each operator to the top-r
principal directions of each kernel's input (``input_basis``). Operator-space influence
(``opspace``) in this space is, at full rank, EK-FAC itself at STRIDE's damping and Fisher; the
two rows differ only by STRIDE's subsets and Lasso. Everything runs under ``jax.jit`` on one
device (no mesh yet).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from stride_jax.errors import ConfigError
from stride_jax.func import curvature, grads
from stride_jax.stride import sites


def ekfac_config(task, cfg) -> ml_collections.ConfigDict:
    """The EK-FAC baseline's config (``methods.influence``) that gives STRIDE's curvature:
    the chosen kernels, the model's own (true) Fisher (a decoder's sampled with ``cfg.seed``,
    one label per token; a classifier's exact expectation over its classes), STRIDE's damping
    relative to each layer's mean eigenvalue, ``_chunk`` rows at a time."""
    k, s1 = cfg.kernels, cfg.stage1
    fisher = fisher_kind(task, cfg)
    select = dict(params_filter=str(k.get("params_filter", "")), fisher=fisher)
    if task.kind == "decoder":  # 0: every block (``kernel_site`` may narrow it to fit)
        select["layers"] = int(k.layers) or task.model_config.n_layers
    lam = float(s1.gate_l2) / (float(s1.w_fidelity) + float(s1.w_stability))
    chunk = _chunk(task, cfg)
    return ml_collections.ConfigDict(
        select | dict(seed=int(cfg.seed), damping=lam, relative_damping=True) | dict(chunk=chunk)
    )


FISHERS = ("true", "empirical")
CURVATURES = ("ekfac", "kfac")


def eigen_correct(cfg) -> bool:
    """``kernels.curvature``: "ekfac" refits the Kronecker eigenbasis' eigenvalues in a second
    pass over the training rows; "kfac" keeps the products of the factors' eigenvalues (one
    pass in all, with the subset sums)."""
    curv = str(cfg.kernels.get("curvature", "ekfac"))
    if curv not in CURVATURES:
        raise ConfigError(f"stride.kernels.curvature must be one of {CURVATURES}, got {curv!r}")
    return curv == "ekfac"


def fisher_kind(task, cfg) -> str:
    """``kernels.fisher`` as ``task.dense_io`` names it: "true" is a decoder's "sampled" (one
    label per token drawn from the base model) and a classifier's "true" (the exact
    expectation over its classes); "empirical" takes the data's labels."""
    if _fisher(cfg) == "empirical":
        return "empirical"
    return "sampled" if task.kind == "decoder" else "true"


def _fisher(cfg) -> str:
    fisher = str(cfg.kernels.get("fisher", "true"))
    if fisher not in FISHERS:
        raise ConfigError(f"stride.kernels.fisher must be one of {FISHERS}, got {fisher!r}")
    return fisher


def check(cfg) -> None:
    """Refuse the settings this site does not implement (before any work)."""
    if sites.check_responses(cfg) != "linear":
        raise ConfigError(
            "stride.hook='kernels' has first-order responses only: set stride.responses='linear'"
        )
    s1 = cfg.stage1
    if s1.get("init", "zero") != "newton" or s1.steps != 0:
        raise ConfigError(
            "stride.hook='kernels' operators are the closed-form Gauss-Newton step: set "
            f"stage1.init='newton' and stage1.steps=0 (got {s1.get('init', 'zero')!r}, "
            f"{s1.steps}); Adam steps need the residual-stream operators "
            "(stride.hook='residual', or preset 'residual' / 'adam' / 'paper')"
        )
    if s1.w_fidelity <= 0 or s1.gate_l2 <= 0:
        raise ConfigError("stride.hook='kernels' needs stage1.w_fidelity > 0 and gate_l2 > 0")
    eigen_correct(cfg)  # both raise on an unknown value
    _fisher(cfg)
    for key in ("layers", "rank"):
        if int(cfg.kernels.get(key, 0)) < 0:
            raise ConfigError(f"stride.kernels.{key} must be >= 0, got {cfg.kernels[key]}")


@dataclasses.dataclass(frozen=True)
class KernelSite(sites.Site):
    """Operators on the dense kernels ``layers`` (module paths, input to output)."""

    layers: tuple = ()

    def encode(self, rows) -> dict:
        """The rows' arrays: gradients are taken through the whole model, nothing cached."""
        return self.task.arrays(rows)

    def curvature(self) -> dict:
        """EK-FAC's (``kernels.curvature="kfac"``: K-FAC's) fitted state, eigenbases and damped
        eigenvalues, at STRIDE's settings."""
        from stride_jax.methods import influence

        ek = ekfac_config(self.task, self.cfg)
        return influence._kfac_fit(self.task, ek, eigen_correct(self.cfg))

    def fit_operators(self, cache, design, keys, mesh, workdir):
        """Every operator in closed form: (None, params, []). The params hold what defines
        the gates ``B_k = scale (F + lam)^-1 g_k`` (``gates``): the curvature's eigenbases
        and damped eigenvalues (``input_basis``: with ``kernels.rank`` the top-rank input
        directions of each kernel), the subset gradients g_k and ``scale = -w_f / (w_f +
        w_s)``. At full rank g_k stay in the kernels' own coordinates (``subset_sums``, T x I
        x O per kernel, from ``fused_fit``) and the responses precondition the Q query
        gradients into them; with ``kernels.rank`` they are stored in the eigenbases
        (``subset_grads``, T x r x O: ``Q_A^T g_k Q_S``) and the query gradients are rotated
        the same way. Either way the T subset gradients are never preconditioned (Q << T)."""
        del keys, mesh, workdir  # one deterministic solve, seconds: nothing to resume
        check_memory(self, design.num_subsets)
        t0 = time.time()
        s1, rank = self.cfg.stage1, int(self.cfg.kernels.get("rank", 0))
        scale = -float(s1.w_fidelity) / (float(s1.w_fidelity) + float(s1.w_stability))
        chunk = _chunk(self.task, self.cfg)
        if rank <= 0:  # full rank: the subset sums ride along the curvature's first pass
            state, g_L = fused_fit(self, cache, design)
            basis, key = input_basis(state), "subset_sums"
            t1 = time.time()
        else:  # the top-r input directions first, then a pass for the subset gradients
            basis, key = input_basis(self.curvature(), rank), "subset_grads"
            t1 = time.time()
            g_L = subset_gradients(self.task, self.layers, cache, design, chunk, basis)
        g_L = jax.block_until_ready(g_L)
        finite = all(bool(jnp.isfinite(x).all()) for x in [*g_L, *basis["lam"]])
        if not finite or not all(bool((m > 0).all()) for m in basis["lam"]):
            raise FloatingPointError(
                "stage 1: the kernel operators' gradients or damped curvature are not finite "
                f"and positive: raise stage1.gate_l2 (now {s1.gate_l2})"
            )
        logging.info(
            "stage 1: kernel operators on %d layers (%d gate parameters each) for %d "
            "subsets: %s %.1fs, then %.1fs",
            len(self.layers),
            sum(int(np.prod(g.shape[1:])) for g in g_L),
            design.num_subsets,
            "curvature with the subset sums" if rank <= 0 else "curvature",
            t1 - t0,
            time.time() - t1,
        )
        return None, basis | {key: list(g_L), "scale": jnp.float32(scale)}, []

    def stage2_responses(self, ops_graphdef, ops_params, cache_q, rows_q, mesh):
        del ops_graphdef, rows_q, mesh
        fn = _responses_fn(self.task, self.layers, _chunk(self.task, self.cfg))
        return fn(self.task.params, cache_q, ops_params)

    def responses(self, ops_graphdef, ops_params, cache_q, rows_q, mesh):
        raise ConfigError("stride.hook='kernels' has first-order responses only")


def gate_params(site: KernelSite) -> int:
    """P: one operator's gate parameters (the steered kernels' sizes, their inputs cut to
    ``kernels.rank``; a classifier's biases, one more input each, are not counted)."""
    from stride_jax.func import layers

    rank = int(site.cfg.kernels.get("rank", 0))
    total = 0
    for p in site.layers:
        i, o = layers.kernel_shape(site.task.params, p)
        total += (i if rank <= 0 else min(rank, i)) * o
    return total


def _gate_bytes(site: KernelSite, num_subsets: int) -> int:
    """What T operators' subset gradients take: T x P float32, twice while they accumulate."""
    return 8 * num_subsets * gate_params(site)


def check_memory(site: KernelSite, num_subsets: int) -> None:
    """Refuse, before any work, T operators whose subset gradients (``_gate_bytes``) would not
    fit in the memory ``resources.available_bytes`` reports."""
    from stride_jax import resources

    p = gate_params(site)
    need, have = _gate_bytes(site, num_subsets), resources.available_bytes()
    if need > have:
        raise ConfigError(
            f"stride.hook='kernels': {num_subsets} operators x {p:,} gate parameters (the "
            f"{len(site.layers)} steered kernels) need {resources.human_bytes(need)}, more than "
            f"the {resources.human_bytes(have)} available: steer fewer blocks "
            "(stride.kernels.layers, kernels.params_filter), read fewer input directions "
            "(kernels.rank), lower design.num_subsets, or use "
            "the residual-stream operators (preset 'residual', stride.hook='residual')"
        )


def _chunk(task, cfg) -> int:
    """Rows per chunk: ``stage1.curvature_batch``, 0 meaning 16 decoder / 256 classifier rows."""
    return int(cfg.stage1.get("curvature_batch", 0)) or (16 if task.kind == "decoder" else 256)


def _io(task, layers):
    """Rows -> (inputs, output gradients) per layer under the data's labels."""

    def io(params, rows):
        a_L, _, [(_, g_L)] = task.dense_io(params, rows, layers, "empirical", None)
        return a_L, g_L

    return io


def input_basis(state: dict, rank: int = 0) -> dict:
    """The curvature in the operators' coordinates: per kernel the top-``rank`` eigenvectors
    of its input factor A (``qa``, I x r; 0 or >= I: all), the output factor's eigenbasis
    (``qs``) and the damped corrected eigenvalues of those rows (``lam``, r x O). With r < I
    each operator reads only the kernel input's top-r principal directions: the paper's
    low-rank basis phi, here the PCA of the layer's input, and P shrinks by I / r."""
    out = {"qa": [], "qs": list(state["qs"]), "lam": []}
    for qa, lam in zip(state["qa"], state["lam"], strict=True):
        r = qa.shape[1] if rank <= 0 else min(rank, qa.shape[1])  # eigh: ascending order
        out["qa"].append(qa[:, qa.shape[1] - r :])
        out["lam"].append(lam[lam.shape[0] - r :])
    return out


def _rotated(a_L, g_L, basis) -> list[jax.Array]:
    """Rows' kernel gradients in the eigenbases, ``Q_A^T G Q_S`` per kernel (B x r x O), from
    the inputs and output gradients (projected first: G is never formed at full size)."""
    return [
        curvature.row_grads(a @ qa, g @ qs)
        for a, g, qa, qs in zip(a_L, g_L, basis["qa"], basis["qs"], strict=True)
    ]


def subset_gradients(task, layers, data: dict, design, chunk: int, basis: dict) -> list[jax.Array]:
    """Each subset's mean of its members' kernel gradients rotated into ``basis``
    (``_rotated``), per kernel T x r x O, accumulated chunk by chunk of training rows (memory
    T x P, never N x P)."""
    n, t = design.num_examples, design.num_subsets
    sizes = jnp.maximum(jnp.asarray(design.sizes_T), 1).astype(jnp.float32)
    subsets_NxD = jnp.asarray(design.subsets_NxD)
    chunks, w = curvature.chunked(data, chunk)
    idx = grads.padded_chunks({"i": jnp.arange(n)}, chunk)["i"]
    fn = _subset_fn(task, tuple(layers), t)
    return fn(task.params, chunks, w, idx, subsets_NxD, sizes, basis)


def _scatter(acc_L, rg_L, w_C, i_C, subsets_NxD, sizes_T):
    """``acc_L`` (per kernel T x ...) plus each row's ``rg`` (C x ...) shared over its
    subsets (weight w / |S_k|; padding rows and slots beyond T add nothing)."""
    t = acc_L[0].shape[0]
    sub_CxD = subsets_NxD[i_C]
    share_CxD = w_C[:, None] / sizes_T[jnp.minimum(sub_CxD, t - 1)]
    out = []
    for g_T, rg in zip(acc_L, rg_L, strict=True):
        add = share_CxD[..., None, None] * rg[:, None]
        out.append(g_T.at[sub_CxD].add(add, mode="drop"))
    return out


def fused_fit(site: KernelSite, data: dict, design) -> tuple[dict, list[jax.Array]]:
    """EK-FAC's state at STRIDE's settings and the subset gradients (per kernel T x I x O,
    the kernel's own coordinates), the subset sums of the members' kernel gradients accumulated in
    the Kronecker factors' pass over the rows: two passes over the training rows in all
    (factors + sums, eigenvalue correction), not three; one under
    ``kernels.curvature="kfac"``. Under ``kernels.fisher="empirical"``
    both use one backward pass per chunk; under the true Fisher the data's labels take a
    second backward from the same forward (``task.dense_io(with_data=True)``)."""
    from stride_jax.methods import influence

    task, cfg = site.task, site.cfg
    ek = ekfac_config(task, cfg)
    n, t = design.num_examples, design.num_subsets
    if n != len(task.train):
        raise ValueError(f"the design has {n} examples, the task {len(task.train)} train rows")
    sizes = jnp.maximum(jnp.asarray(design.sizes_T), 1).astype(jnp.float32)
    subsets_NxD = jnp.asarray(design.subsets_NxD)
    idx = grads.padded_chunks({"i": jnp.arange(n)}, max(1, int(ek.chunk)))["i"]

    def step(acc, rows, w_C, i_C, out):
        a_L, g_L = out[0], out[3]  # the data labels' gradients, from the factors' forward
        rg = [curvature.row_grads(a, g) for a, g in zip(a_L, g_L, strict=True)]
        return _scatter(acc, rg, w_C, i_C, subsets_NxD, sizes)

    one = jax.tree.map(lambda a: a[:1], data)
    a_L, g_L = jax.eval_shape(lambda r: _io(task, site.layers)(task.params, r), one)
    init = [jnp.zeros((t, a.shape[-1], g.shape[-1])) for a, g in zip(a_L, g_L, strict=True)]
    return influence._kfac_fit(task, ek, eigen_correct(cfg), extra=(init, step, idx))


def _subset_fn(task, layers, t: int):
    io = _io(task, layers)

    def row_grads(params, rows, basis):
        return _rotated(*io(params, rows), basis)

    @jax.jit
    def fn(params, chunks, w_KxC, idx_KxC, subsets_NxD, sizes_T, basis):
        def body(acc, xs):
            rows, w_C, i_C = xs
            rg = row_grads(params, rows, basis)
            return _scatter(acc, rg, w_C, i_C, subsets_NxD, sizes_T), None

        one = jax.tree.map(lambda a: a[0], chunks)
        shapes = jax.eval_shape(lambda r: row_grads(params, r, basis), one)
        init = [jnp.zeros((t, *x.shape[1:])) for x in shapes]
        return jax.lax.scan(body, init, (chunks, w_KxC, idx_KxC))[0]

    return fn


def gates(params: dict) -> list[jax.Array]:
    """Every operator's gates ``B_k = scale (F + lam)^-1 g_k`` per kernel (T x I x O), from
    ``fit_operators``' params: ``scale Q_A (g~_k / lam) Q_S^T`` (the responses never form
    them)."""

    @jax.jit
    def fn(params):
        if "subset_sums" in params:  # the kernels' own coordinates: rotate them first
            pairs = zip(params["subset_sums"], params["qa"], params["qs"], strict=True)
            rot = [jnp.einsum("ai,tab,bj->tij", qa, g, qs) for g, qa, qs in pairs]
        else:
            rot = params["subset_grads"]
        return [
            params["scale"] * jnp.einsum("ir,tro,jo->tij", qa, g / lam, qs)
            for g, qa, qs, lam in zip(rot, params["qa"], params["qs"], params["lam"], strict=True)
        ]

    return fn(params)


def _dots(a_L, b_L) -> jax.Array:
    """sum over kernels of <a, b>: A x B from rotated gradients (A x r x O, B x r x O)."""
    return sum(curvature.flat_dots(a, b) for a, b in zip(a_L, b_L, strict=True))


def _preconditioned(a_L, g_L, basis) -> list[jax.Array]:
    """Rows' ``(F + lam)^-1 G`` in the eigenbases: their rotated gradients over lam."""
    rot = _rotated(a_L, g_L, basis)
    return [x / lam for x, lam in zip(rot, basis["lam"], strict=True)]


_DOT_BYTES = 1 << 28  # query gradients per block of the responses' contraction (256 MiB)


def _responses_fn(task, layers, chunk: int):
    """y_QxT = -sum_l <G_q^l, B_k^l> = -scale sum_l <Q_A^T G_q Q_S / lam, g~_k>: query
    gradients ``chunk`` rows at a time, rotated and preconditioned, then one contraction per
    block of queries (``_DOT_BYTES`` of them) against the rotated subset gradients (with
    ``subset_sums``: rotated back, ``Q_A (...) Q_S^T``, against the unrotated ones). The T x P
    subset gradients are read once per block, not once per ``chunk`` of queries: at T = N =
    2,000 they are 0.5 GB, and re-reading them for every 16 queries bound the responses on
    memory bandwidth (lm_shakespeare's 200 queries: 2.6 s -> 1.0 s, compilation included)."""
    io = _io(task, layers)

    def back(pre_L, ops):
        pairs = zip(pre_L, ops["qa"], ops["qs"], strict=True)
        return [jnp.einsum("ai,qij,bj->qab", qa, p, qs) for p, qa, qs in pairs]

    def pre(params, ops, r):
        p = _preconditioned(*io(params, r), ops)
        return back(p, ops) if "subset_sums" in ops else p

    @jax.jit
    def fn(params, data_q, ops):
        subset = ops["subset_sums"] if "subset_sums" in ops else ops["subset_grads"]
        per_row = 4 * sum(int(np.prod(g.shape[1:])) for g in subset)
        block = max(chunk, _DOT_BYTES // per_row // chunk * chunk)
        block = min(block, -(-grads.num_rows(data_q) // chunk) * chunk)  # no padded blocks

        def rows(r):
            pre_L = grads.map_rows(lambda c: pre(params, ops, c), r, chunk)
            return -ops["scale"] * _dots(pre_L, subset)

        return grads.map_rows(rows, data_q, block)

    return fn


def kernel_site(task, cfg) -> KernelSite:
    """The kernel operators' site for ``task`` under the ``stride`` config ``cfg``.

    A decoder's ``kernels.layers = 0`` is automatic: every block when the T operators'
    subset gradients fit in memory (``check_memory``), else as many of the last blocks as fit
    (logged as an ``auto:`` line; the site's config records the choice). When not even the
    last block fits, ``check_memory`` refuses at fit time, naming the knobs."""
    check(cfg)
    site = KernelSite(task, cfg, tuple(task.dense_layers(ekfac_config(task, cfg))))
    if task.kind != "decoder" or int(cfg.kernels.layers) != 0:
        return site
    from stride_jax import resources
    from stride_jax.stride import method

    t = method.resolve_num_subsets(cfg.design, len(task.train), "decoder")
    n_layers, have = task.model_config.n_layers, resources.available_bytes()
    layers = n_layers
    while layers > 1 and _gate_bytes(site, t) > have:
        layers -= 1
        narrowed = cfg.copy_and_resolve_references()
        narrowed.kernels.layers = layers
        site = KernelSite(task, narrowed, tuple(task.dense_layers(ekfac_config(task, narrowed))))
    if layers < n_layers:
        logging.warning(
            "auto: stride.kernels.layers: 0 -> %d of %d blocks (T=%d operators x %d gate "
            "parameters fit in the %s available; every block would not)",
            layers,
            n_layers,
            t,
            gate_params(site),
            resources.human_bytes(have),
        )
    return site


# --- operator-space influence in the kernel space (``opspace`` with hook="kernels") ----------


def opspace_fit(site: KernelSite) -> dict:
    """The curvature in the operators' coordinates (``input_basis``, ``kernels.rank``)."""
    return input_basis(site.curvature(), int(site.cfg.kernels.get("rank", 0)))


def opspace_score(site: KernelSite, basis: dict, query) -> np.ndarray:
    """``score(q, i) = <(F + lam)^-1 G_q, G_i>`` in the kernel space: the queries' rotated
    gradients once (Q x P), the training rows' ``chunk`` at a time. At full rank this is
    EK-FAC at STRIDE's settings."""
    from stride_jax import methods

    task, chunk = site.task, _chunk(site.task, site.cfg)
    io = _io(task, site.layers)

    @jax.jit
    def fn(params, train, data_q, basis):
        pre_q = grads.map_rows(lambda r: _preconditioned(*io(params, r), basis), data_q, chunk)

        def rows(r):
            return _dots(_rotated(*io(params, r), basis), pre_q)

        return grads.map_rows(rows, train, chunk).T

    out = fn(task.params, task.arrays(task.train), task.arrays(query), basis)
    return methods.as_scores(out)
