"""STRIDE on a language model behind the common method interface (residual-stream hook).

``fit``: the design over training rows, the base model's residual stream at ``layer`` cached
once, stage 1 (resumable). ``score``: all-T responses per query block in one jitted call, then
the batched Lasso; scores are per training row (chunks sum back to examples elsewhere).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from stride_jax import checkpoint, lm_stride, pipeline, recover, sharding, train
from stride_jax.baselines.base import LMTask, as_scores, register_lm
from stride_jax.errors import ConfigError


def default_config() -> ml_collections.ConfigDict:
    """Defaults for a small decoder on CPU; ``layer=-1`` means round(2/3 of the depth).

    Stage 1 (600 steps, 10 member rows per subset) was chosen on the 100 validation blocks of
    lm_shakespeare (``experiments/tune_lm.py``): LDS 0.129 against 0.092 for 300 steps of 4
    rows; hook layer 0 / 1 / 2 gave -0.001 / 0.092 / 0.091, stability weight 10 gave 0.083,
    Lasso lam_frac 0.01 / 0.05 / 0.2 gave 0.095 / 0.092 / 0.097.
    """
    return ml_collections.ConfigDict(
        dict(
            seed=3,
            layer=-1,
            vocab_chunk=8192,
            encode_batch=16,
            op_chunk=64,
            query_batch=1,
            design=dict(kind="expander", num_subsets=1000, degree=5, seed=2),
            stage1=pipeline.stage1_defaults(
                rank=16,
                basis_scale=1.0,
                steps=600,
                log_every=50,
                ckpt_every=300,
                warmup_steps=30,
                lr=1e-2,
                lr_muon=0.02,
                lr_end_frac=0.1,
                subsets_per_step=32,
                fidelity_rows="sample",
                fidelity_batch=10,
                stability_rows="per_subset",
                stability_batch=4,
                probe_batch=4,
                top_k=16,
                sketch_dim=16,
                linearity_over_all=False,
                w_fidelity=1.0,
                w_linearity=1.0,
                gate_l2=0.0,
            ),
            lasso=pipeline.lasso_defaults() | dict(lam_frac=0.05, maxiter=500),
        )
    )


def hook_layer(cfg, n_layers: int) -> int:
    """Residual stream after ``layer`` blocks (0: the embeddings; n_layers: the final residual,
    only the final norm and the head above it)."""
    layer = round(2 * n_layers / 3) if cfg.layer < 0 else int(cfg.layer)
    if not 0 <= layer <= n_layers:
        raise ConfigError(f"stride layer must be in 0..{n_layers} (the model has {n_layers})")
    return layer


@dataclasses.dataclass
class LMFitted:
    design: object
    upper: lm_stride.Upper
    graphdef: object
    params: object
    history: list
    seconds: dict
    # (query blocks object, y_QxT) of the last ``score``: a Lasso sweep reuses the responses.
    last_responses: tuple = ()


def _keys(cfg):
    return jax.random.split(jax.random.key(cfg.seed), 3)  # sketch, stage 1, Lasso


def _encode(task: LMTask, upper: lm_stride.Upper, blocks, cfg):
    return lm_stride.encode(
        task.graphdef,
        task.params,
        task.data(blocks),
        upper.layer,
        cfg.stage1.top_k,
        cfg.vocab_chunk,
        cfg.encode_batch,
    )


# Stage 1 does not depend on ``lasso``: a tuning sweep over Lasso settings in one process
# reuses the trained operators (one fit kept, keyed by everything else it depends on).
_FITS: dict = {}


def fit(task: LMTask, cfg) -> LMFitted:
    stage1_cfg = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "lasso"})
    hit = _FITS.get("entry")
    # The entry holds the task's params and data objects, so ``is`` cannot match a new object.
    if hit and hit[0] == stage1_cfg and hit[1] is task.params and hit[2] is task.train:
        return hit[3]
    fitted = _fit(task, cfg)
    _FITS["entry"] = (stage1_cfg, task.params, task.train, fitted)
    return fitted


def _fit(task: LMTask, cfg) -> LMFitted:
    if cfg.stage1.probe_mask_members:
        raise ConfigError("stage1.probe_mask_members is not supported for language models")
    mesh = task.mesh if task.mesh is not None else sharding.make_mesh()
    workdir = os.path.join(task.workdir, "stride") if task.workdir else None
    if workdir:
        checkpoint.guard_config(workdir, cfg.to_dict())
    design = pipeline.make_design(cfg.design, len(task.train))
    upper = lm_stride.Upper(
        task.graphdef, hook_layer(cfg, task.model_config.n_layers), cfg.vocab_chunk
    )
    t0 = time.time()
    cache = _encode(task, upper, task.train, cfg)
    logging.info("stride-lm: hook after layer %d, cached %s", upper.layer, cache["h"].shape)
    sketch_key, train_key, _ = _keys(cfg)
    inputs = lm_stride.make_inputs(
        upper, task.params, cache, task.data(), design, cfg.stage1, sketch_key
    )
    d = task.model_config.d_model
    graphdef, params, history = train.fit_operators(
        inputs,
        cfg.stage1,
        train_key,
        mesh,
        workdir,
        dims=(d, d),
        build_chunk=lm_stride.build_train_chunk,
    )
    return LMFitted(design, upper, graphdef, params, history, {"stage1": time.time() - t0})


def responses(task: LMTask, fitted: LMFitted, query, cfg) -> np.ndarray:
    """y_QxT (float32 numpy) for the query blocks."""
    cache = _encode(task, fitted.upper, query, cfg)
    y = lm_stride.response_matrix(
        fitted.upper, task.params, fitted.graphdef, fitted.params, cache, task.data(query), cfg
    )
    return np.asarray(jax.device_get(y), np.float32)


def score(task: LMTask, fitted: LMFitted, query, cfg):
    mesh = task.mesh if task.mesh is not None else sharding.make_mesh()
    t0 = time.time()
    if fitted.last_responses and fitted.last_responses[0] is query:
        y_QxT = fitted.last_responses[1]
    else:
        y_QxT = responses(task, fitted, query, cfg)
        fitted.last_responses = (query, y_QxT)
    fitted.seconds["responses"] = time.time() - t0
    logging.info("stride-lm: responses %s in %.2fs", y_QxT.shape, fitted.seconds["responses"])
    t0 = time.time()
    out = recover.lasso_scores(
        fitted.design, y_QxT, pipeline.lasso_config(cfg.lasso), key=_keys(cfg)[2], mesh=mesh
    )
    fitted.seconds["lasso"] = time.time() - t0
    return as_scores(out["scores_QxN"])


register_lm("stride", fit, score)
