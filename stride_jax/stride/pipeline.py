"""STRIDE's config blocks and the pieces its method (``stride.method``) shares: the design
of ``stride.design``, the Lasso's config and targets, the stage-1 and Lasso defaults."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging

from stride_jax.errors import ConfigError
from stride_jax.stride import recover, subsets


def lasso_config(config) -> recover.LassoConfig:
    return recover.LassoConfig(**config.to_dict())


def stage1_defaults(**overrides) -> dict:
    """The ``stage1`` block of a STRIDE config; ``overrides`` replace keys. These are the
    Adam recipe (zero-gate start, 200 steps; chosen on validation digits), from which the
    language-model defaults start; ``config.base_config`` applies ``NEWTON_RECIPE`` on top for
    classifiers (one Gauss-Newton step, ``stride_jax.newton``).

    The Adam recipe trains every operator at every step (``subsets_per_step=0``) on
    all its members, with one shared stability batch, a small fidelity weight and an L2
    penalty on the gates: each operator then sits near the optimum of "a small step towards
    its subset, held back by the KL to the base model", where its loss drops add up over
    examples (see README, "How STRIDE is trained").
    """
    out = dict(
        rank=256,
        basis_scale=0.1,
        init="zero",
        steps=200,
        log_every=50,
        ckpt_every=100,
        warmup_steps=50,
        lr=1e-2,
        lr_muon=0.0,
        lr_end_frac=0.05,
        weight_decay=0.0,
        subsets_per_step=0,
        fidelity_rows="all",
        fidelity_batch=16,
        stability_rows="shared",
        stability_batch=128,
        probe_batch=64,
        top_k=10,
        sketch="features",
        sketch_dim=32,
        ridge=1.0,
        intercept=True,
        probe_mask_members=False,
        linearity_over_all=True,
        w_fidelity=1e-2,
        w_stability=1.0,
        w_linearity=0.1,
        gate_l2=1e-4,
    )
    unknown = set(overrides) - set(out)
    if unknown:
        raise ConfigError(f"unknown stage1 keys {sorted(unknown)}")
    return out | overrides


# The classifier recipe of ``config.base_config`` (chosen on validation digits and MNIST-5k,
# experiments/RESULTS.md): stage 1 as one damped Gauss-Newton step (``newton``) with a light
# fidelity weight, no Adam steps after it.
NEWTON_RECIPE = dict(init="newton", steps=0, w_fidelity=3e-4, gate_l2=6e-5)


def lasso_defaults(**overrides) -> dict:
    """The ``lasso`` block of a STRIDE config: ``recover.LassoConfig`` with a 6-point path of
    25 FISTA steps each down to 0.01 lambda_max. On the validation queries (responses of the
    default operators): digits 0.6807 vs 0.6809 for 4 points x 100 steps (which matched
    8 x 500 to 4 digits), MNIST-5k 0.6491 vs 0.6465, at 0.5x / 0.4x of the time; 4 x 25 equals
    4 x 100 on both; lam_frac 0.003 / 0.01 / 0.05 gave 0.652 / 0.653 / 0.637 on digits."""
    defaults = dict(path_len=6, maxiter=25, lam_frac=0.01)
    return dataclasses.asdict(recover.LassoConfig(**(defaults | overrides)))


def lasso_targets(y_QxT: np.ndarray, design: subsets.Design, config) -> np.ndarray:
    """What the Lasso fits: the responses, times each subset's size with
    ``config.size_weighted`` (the fidelity loss averages over S_k's members, so operator k
    responds to ``sum_{i in S_k} b_i / |S_k|``; scaled, the rows fit ``A b`` exactly)."""
    if not config.get("size_weighted", False):
        return y_QxT
    return y_QxT * np.asarray(design.sizes_T, y_QxT.dtype)[None]


def make_design(dc, n: int) -> subsets.Design:
    """The design of ``stride.design`` over n training examples; refuses empty subsets."""
    if n < 1:
        raise ValueError("need at least one training example")
    design = subsets.make_design(jax.random.key(dc.seed), dc.kind, dc.num_subsets, n, dc.degree)
    sizes = design.sizes_T
    if sizes.min() == 0:
        raise ConfigError(
            f"{int((sizes == 0).sum())} of the {design.num_subsets} subsets are empty "
            f"(N*d = {n * dc.degree} < T?); lower stride.design.num_subsets or raise degree"
        )
    logging.info(
        "stride: %s design, T=%d subsets, d=%d, subset sizes %d..%d",
        dc.kind,
        design.num_subsets,
        dc.degree,
        sizes.min(),
        sizes.max(),
    )
    return design
