"""Ground truth for LDS: M models really retrained on random alpha-subsets.

All M retrains run in one jitted call: ``mlp.fit`` (the base model's recipe, unchanged)
vmapped over (init key, kept mask) and micro-batched with ``lax.map``; models are sharded
over the mesh's ``data`` axis. Each model has its own init key drawn from the ground-truth
seed. The masks and the per-model query losses are cached in the workdir.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from stride_jax import checkpoint, sharding
from stride_jax.data import Splits
from stride_jax.models import mlp
from stride_jax.stride import subsets


def retrain_many(model_config, keys_M, x_NxF, y_N, masks_MxN, num_classes, mesh, batch: int):
    """Params of M models (stacked on a leading axis), model m trained on masks_MxN[m]."""
    sharding.check_divisible(
        "number of retrained models M", masks_MxN.shape[0], mesh, sharding.DATA
    )
    fn = _retrain_fn(model_config.to_json(), num_classes, mesh, batch)
    return fn(keys_M, jnp.asarray(x_NxF), jnp.asarray(y_N), jnp.asarray(masks_MxN, jnp.float32))


@functools.lru_cache(maxsize=8)
def _retrain_fn(model_config_json: str, num_classes: int, mesh, batch: int):
    """The jitted vmapped trainer, cached per (recipe, classes, mesh, micro-batch)."""
    model_config = ml_collections.ConfigDict(json.loads(model_config_json))

    def train_all(keys, x, y, masks):
        def one(args):
            return mlp.fit(model_config, args[0], x, y, args[1], num_classes)

        return jax.lax.map(one, (keys, masks), batch_size=batch)

    models = sharding.along(mesh, sharding.DATA, 1)
    rep = sharding.replicated(mesh)
    return jax.jit(
        train_all, in_shardings=(models, rep, rep, sharding.along(mesh, sharding.DATA, 2))
    )


def query_losses(model_config, params_M, x_QxF, y_Q, num_classes, batch: int = 50) -> jax.Array:
    """losses_MxQ: cross-entropy of every stacked model on every query, ``batch`` at a time."""
    x_QxF = jnp.asarray(x_QxF, jnp.float32)
    fn = _losses_fn(model_config.to_json(), int(x_QxF.shape[1]), int(num_classes), int(batch))
    return fn(params_M, x_QxF, jnp.asarray(y_Q))


@functools.lru_cache(maxsize=8)
def _losses_fn(model_config_json: str, in_dim: int, num_classes: int, batch: int):
    """The jitted loss evaluator, cached per (recipe, shapes, micro-batch)."""
    model_config = ml_collections.ConfigDict(json.loads(model_config_json))
    graphdef, _ = mlp.abstract(model_config, in_dim, num_classes)

    @jax.jit
    def fn(params_M, x_QxF, y_Q):
        def one(p):
            return mlp.cross_entropy(mlp.apply(graphdef, p, x_QxF), y_Q)

        return jax.lax.map(one, params_M, batch_size=batch)

    return fn


def masks_and_keys(seed: int, num_models: int, num_examples: int, alpha: float):
    """(masks_MxE bool, init keys_M) of M retrains, both drawn from one seed: what the ground
    truth, the datamodel reference and ``evaluate.ground_truth`` retrain."""
    mask_key, init_key = jax.random.split(jax.random.key(seed))
    masks = subsets.retention_masks(mask_key, num_models, num_examples, alpha)
    return masks, jax.random.split(init_key, num_models)


def build(config, model_config, splits: Splits, mesh, workdir: str | None = None) -> dict:
    """Masks (M x N, bool) and query losses (M x Q, float32); cached as groundtruth.npz."""
    path = os.path.join(workdir, "groundtruth.npz") if workdir else None
    if path and os.path.exists(path):
        cached = checkpoint.load_arrays(path)
        n, q = len(splits.train), len(splits.query)
        if (
            cached["masks_MxN"].shape != (config.num_models, n)
            or cached["losses_MxQ"].shape[1] != q
        ):
            raise checkpoint.CheckpointError(
                f"{path} was built for other data or settings (masks {cached['masks_MxN'].shape},"
                f" expected ({config.num_models}, {n})); use a new --workdir"
            )
        logging.info("ground truth: reusing %s", path)
        return cached
    masks, keys = masks_and_keys(config.seed, config.num_models, len(splits.train), config.alpha)
    logging.info(
        "ground truth: retraining %d models on %.0f%% subsets (vmapped, %d at a time)",
        config.num_models,
        100 * config.alpha,
        config.models_per_batch,
    )
    t0 = time.time()
    params = retrain_many(
        model_config,
        keys,
        jnp.asarray(splits.train.x_NxF),
        jnp.asarray(splits.train.y_N),
        masks,
        splits.num_classes,
        mesh,
        config.models_per_batch,
    )
    losses = query_losses(
        model_config,
        params,
        jnp.asarray(splits.query.x_NxF),
        jnp.asarray(splits.query.y_N),
        splits.num_classes,
        config.models_per_batch,
    )
    out = {"masks_MxN": masks, "losses_MxQ": jax.device_get(losses)}
    logging.info(
        "ground truth: done in %.1fs; mean query loss %.4f", time.time() - t0, float(losses.mean())
    )
    if path:
        checkpoint.save_arrays(path, **out)
    return out
