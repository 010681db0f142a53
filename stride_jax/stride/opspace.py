"""Operator-space influence: STRIDE's operator space without subsets or a Lasso.

Each training row's own influence, measured in the space STRIDE's operators steer (the gates
B of one operator at the same site, rank and basis): upweighting row n moves the gates by
``-(H + lam I)^-1 g_n`` (the damped Gauss-Newton step of stage 1, ``newton``), which changes
a query's loss by ``-g_q^T (H + lam I)^-1 g_n``. The score ``g_q^T (H + lam I)^-1 g_n``
(higher = the row lowers the query's loss) is what STRIDE's subsets and Lasso estimate from
T aggregated operators; this method computes it directly for every row, so the gap between
the two is what the design and the recovery cost (``stride`` vs ``opspace`` rows of a job).
At full rank (``stage1.rank`` = the hooked width) it is the ceiling of the operator space.

``lam`` is STRIDE's own damping relative to the curvature: ``gate_l2 / (w_fidelity +
w_stability)`` of the ``stage1`` block. The config is STRIDE's (``defaults.default``): the
same site, layer, rank, basis and Fisher samples.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from stride_jax import distributed
from stride_jax.stride import defaults, kernel_passes, kernels, method, newton, stage1


@dataclasses.dataclass
class Fitted:
    site: object
    graphdef: object
    params: object
    # (H + lam I)^-1 g_n for every training row; with kernel operators the curvature in
    # their coordinates (``kernel_passes.input_basis``)
    solved_NxP: object
    seconds: dict


def damping(config) -> float:
    """STRIDE's damping of the curvature: the Newton step solves
    ``((w_f + w_s) H + gate_l2 I) B = -w_f g``, i.e. ``H + lam I`` with this lam."""
    return float(config.gate_l2) / (float(config.w_fidelity) + float(config.w_stability))


def fit(task, cfg) -> Fitted:
    t0 = time.time()
    site = task.site(cfg)
    if isinstance(site, kernels.KernelSite):  # at full rank, EK-FAC at STRIDE's settings
        rank = int(site.cfg.kernels.get("rank", 0))  # the curvature in the gates' coordinates
        state = kernel_passes.input_basis(site.curvature(), rank)
        return Fitted(site, None, None, state, {"fit": time.time() - t0})
    design = method.design_for(cfg.design, len(task.train), task.kind)
    cache = site.encode(task.train)
    sketch_key, train_key, _ = method._keys(cfg)
    inputs = site.stage1_inputs(cache, design, sketch_key)
    kwargs = site.operator_kwargs(cache, design.num_subsets)
    ops = stage1.initial_operators(inputs, cfg.stage1, train_key, **kwargs)  # STRIDE's basis
    graphdef, params = nnx.split(ops, nnx.Param)
    lam = damping(cfg.stage1)

    @jax.jit
    def solve(params, inputs):
        h_PxP, g_NxP = newton.curvature_and_gradients(nnx.merge(graphdef, params), inputs)
        # An eigendecomposition, not Cholesky: at small damping the float32 curvature can
        # be too ill-conditioned to factor (e.g. full rank at the embeddings, where LN(h)
        # leaves one direction out); its rounding-level negative eigenvalues are clipped.
        evals, evecs = jnp.linalg.eigh(h_PxP)
        inv = 1.0 / (jnp.maximum(evals, 0.0) + lam)
        return ((g_NxP @ evecs) * inv) @ evecs.T

    solved = jax.block_until_ready(solve(params, inputs))
    seconds = {"fit": time.time() - t0}
    logging.info(
        "opspace: %d rows x %d gate parameters, damping %.3g, in %.1fs",
        solved.shape[0],
        solved.shape[1],
        lam,
        seconds["fit"],
    )
    return Fitted(site, graphdef, params, solved, seconds)


def score(task, fitted: Fitted, query, cfg) -> np.ndarray:
    del task, cfg
    site = fitted.site
    if isinstance(site, kernels.KernelSite):
        chunk = kernels.chunk_rows(site.task, site.cfg)
        return kernel_passes.opspace_scores(site.task, site.layers, chunk, fitted.solved_NxP, query)
    inputs = site.row_inputs(site.encode(query), query)
    graphdef = fitted.graphdef

    @jax.jit
    def scores(params, inputs, solved_NxP):
        g_QxP = newton.row_gradients(nnx.merge(graphdef, params), inputs)
        return g_QxP @ solved_NxP.T

    out = scores(fitted.params, inputs, fitted.solved_NxP)
    return np.asarray(distributed.to_host(out), np.float32)


def register() -> None:
    from stride_jax import methods

    methods.register("opspace", fit, score, default_config=defaults.default)


register()
