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
baseline's ``relative_damping``): layers' curvatures differ by orders of magnitude. The
subset means of the members' gradients ride along a pass the curvature makes anyway
(``kernel_passes.fused_fit``: at full rank in the kernels' own coordinates, on EK-FAC's
eigenvalue correction or K-FAC's factors; with ``kernels.rank``, on EK-FAC's eigenvalue
correction in its eigenbases): stage 1 reads the training rows twice (once under "kfac").

Responses are first order (``responses="linear"``): ``y_k(q) = -<G_q, B_k>`` summed over the
layers, from one gradient per query row. The steered forward pass and Adam steps are not
implemented for this site (refused). ``kernels.rank`` restricts each operator to the top-r
principal directions of each kernel's input (``kernel_passes.input_basis``).
Operator-space influence (``opspace``) in this space is, at full rank, EK-FAC itself at
STRIDE's damping and Fisher; the two rows differ only by STRIDE's subsets and Lasso. The
passes over rows are in ``kernel_passes``; everything runs under ``jax.jit`` on one device
(no mesh yet).
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
from stride_jax.stride import kernel_passes as passes
from stride_jax.stride import sites


def ekfac_config(task, cfg) -> ml_collections.ConfigDict:
    """The EK-FAC baseline's config (``methods.influence``) that gives STRIDE's curvature:
    the chosen kernels, the model's own (true) Fisher (a decoder's sampled with ``cfg.seed``,
    one label per token; a classifier's exact expectation over its classes), STRIDE's damping
    relative to each layer's mean eigenvalue, ``chunk_rows`` rows at a time."""
    k, s1 = cfg.kernels, cfg.stage1
    fisher = fisher_kind(task, cfg)
    select = dict(params_filter=str(k.get("params_filter", "")), fisher=fisher)
    if task.kind == "decoder":  # 0: every block (``kernel_site`` may narrow it to fit)
        select["layers"] = int(k.layers) or task.model_config.n_layers
    lam = float(s1.gate_l2) / (float(s1.w_fidelity) + float(s1.w_stability))
    chunk = chunk_rows(task, cfg)
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
        w_s)``. At full rank g_k stay in the kernels' own coordinates (``subset_sums``,
        T x I x O), riding along EK-FAC's eigenvalue-correction pass (the default: two passes
        over the training rows) or K-FAC's factors' pass (one), and the responses precondition
        the Q query gradients and rotate them back into those coordinates. With
        ``kernels.rank`` under EK-FAC they ride along the eigenvalue-correction pass in the
        eigenbases it has just computed (``subset_grads``, T x r x O: ``Q_A^T g_k Q_S``), and
        the query gradients are rotated the same way. K-FAC with ``kernels.rank`` needs the
        eigenbasis first, then a pass for g_k. Either way the T subset gradients are never
        preconditioned (Q << T)."""
        del keys, mesh, workdir  # one deterministic solve, seconds: nothing to resume
        check_memory(self, design.num_subsets)
        t0 = time.time()
        s1, rank = self.cfg.stage1, int(self.cfg.kernels.get("rank", 0))
        scale = -float(s1.w_fidelity) / (float(s1.w_fidelity) + float(s1.w_stability))
        chunk = chunk_rows(self.task, self.cfg)
        ek, ec = ekfac_config(self.task, self.cfg), eigen_correct(self.cfg)
        if ec or rank <= 0:  # the subset gradients ride along a pass of the curvature
            state, g_L, key, ok = passes.fused_fit(self.task, ek, ec, design, rank)
            basis = passes.input_basis(state, rank)
            what = "curvature with the subset gradients"
        else:  # K-FAC's top-r input directions first, then a pass for the subset gradients
            basis = jax.block_until_ready(passes.input_basis(self.curvature(), rank))
            g_L, key = (
                passes.subset_gradients(self.task, self.layers, cache, design, chunk, basis),
                "subset_grads",
            )
            ok = _finite(g_L)
            what = "curvature, then the subset gradients"
        g_L = jax.block_until_ready(g_L)
        t1 = time.time()
        if not (bool(ok) and _positive(basis["lam"])):
            raise FloatingPointError(
                "stage 1: the kernel operators' gradients or damped curvature are not finite "
                f"and positive: raise stage1.gate_l2 (now {s1.gate_l2})"
            )
        logging.info(
            "stage 1: kernel operators on %d layers (%d gate parameters each) for %d "
            "subsets: %s in %.1fs",
            len(self.layers),
            sum(int(np.prod(g.shape[1:])) for g in g_L),
            design.num_subsets,
            what,
            t1 - t0,
        )
        return None, basis | {key: list(g_L), "scale": jnp.float32(scale)}, []

    def stage2_responses(self, ops_graphdef, ops_params, cache_q, rows_q, mesh):
        del ops_graphdef, rows_q, mesh
        fn = passes.responses_fn(self.task, self.layers, chunk_rows(self.task, self.cfg))
        return fn(self.task.params, cache_q, ops_params)

    def responses(self, ops_graphdef, ops_params, cache_q, rows_q, mesh):
        raise ConfigError("stride.hook='kernels' has first-order responses only")


@jax.jit
def _finite(g_L) -> jax.Array:
    """Whether every subset gradient is finite, through their sum, which a NaN or an
    infinity makes non-finite: on lm_shakespeare's 0.5 GB that program compiles in
    0.13-0.17 s and runs in 15 ms, against 0.30-0.33 s and 95-104 ms for an ``isfinite`` per
    entry (a sum of finite gradients past float32's 3e38 would be refused too). The fused
    passes carry this flag themselves (``kernel_passes._into_subsets``)."""
    return jnp.isfinite(sum(jnp.sum(g) for g in g_L))


def _positive(lam_L) -> bool:
    """Whether every damped eigenvalue is finite and positive, on the host (one per gate
    parameter, P floats in all: no program compiled for it)."""
    return all(bool(np.all(np.isfinite(m) & (m > 0))) for m in jax.device_get(list(lam_L)))


def _finite_and_positive(g_L, lam_L) -> bool:
    """``_finite`` and ``_positive``: the check of the fit's operators."""
    return bool(_finite(g_L)) and _positive(lam_L)


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
    """What T operators' subset gradients take, counted twice: T x P float32 for the sums,
    and as much again as headroom. The pass's carry takes over the zeros' buffer (donated),
    so the sums are held once, but the refusal stays on the safe side."""
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


def chunk_rows(task, cfg) -> int:
    """Rows per chunk: ``stage1.curvature_batch``, 0 meaning 16 decoder / 256 classifier rows."""
    return int(cfg.stage1.get("curvature_batch", 0)) or (16 if task.kind == "decoder" else 256)


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
