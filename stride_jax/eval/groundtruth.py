"""Ground truth for LDS: M models really retrained on random alpha-subsets.

The M retrains run in groups, one jitted call per group: ``mlp.fit`` (the base model's
recipe, unchanged) vmapped over (init key, kept mask), the models split over every device
of the mesh (``sharding.EVERY``); the group size is ``groundtruth.models_per_batch``, or
when 0 chosen from the memory available (``resources.models_at_once``); progress is logged
with rate and ETA. Each model has its own init key drawn from the ground-truth seed. The
masks and the per-model query losses are cached in the workdir.
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

from stride_jax import checkpoint, distributed, resources, sharding
from stride_jax.data import Splits
from stride_jax.models import mlp
from stride_jax.stride import subsets


def retrain_many(
    model_config, keys_M, x_NxF, y_N, masks_MxN, num_classes, mesh, batch: int, label="retrains"
):
    """Params of M models (stacked on a leading axis), model m trained on masks_MxN[m];
    ``batch`` models per vmapped call (0: ``group_size``'s automatic choice), split over
    every device of the mesh, the last group padded; progress logged as ``label``."""
    x, y = jnp.asarray(x_NxF), jnp.asarray(y_N)
    masks = jnp.asarray(masks_MxN, jnp.float32)
    m = masks.shape[0]
    group = group_size(model_config, x.shape, num_classes, m, batch, mesh, label)
    fn = _retrain_fn(model_config.to_json(), num_classes, mesh)
    parts, progress = [], resources.Progress(label, m)
    for start in range(0, m, group):
        keys_G, _ = sharding.pad_to_multiple(keys_M[start : start + group], group)
        masks_G, n = sharding.pad_to_multiple(masks[start : start + group], group)
        params = jax.block_until_ready(fn(keys_G, x, y, masks_G))  # for honest progress
        parts.append(jax.tree.map(lambda a, n=n: a[:n], params))
        progress.update(start + n)
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


def group_size(
    model_config, x_shape, num_classes, num_models, requested, mesh=None, what="retrains"
) -> int:
    """Models per vmapped retrain call: ``requested`` (at most M) or, when 0,
    ``resources.models_at_once`` for one MLP retrain on ``x_shape = (N, F)``; rounded up to
    a multiple of the mesh's device count (the models are split over every device)."""
    multiple = 1 if mesh is None else sharding.size(mesh)
    if int(requested) > 0:
        group = min(int(requested), max(int(num_models), 1))
        return -(-group // multiple) * multiple
    n, f = x_shape
    dims = [f, *model_config.hidden, num_classes]
    num_params = sum((a + 1) * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    per_model = resources.classifier_retrain_bytes(
        n, f, model_config.hidden, num_classes, num_params
    )
    return resources.models_at_once(0, num_models, per_model, what=what, multiple=multiple)


@functools.lru_cache(maxsize=8)
def _retrain_fn(model_config_json: str, num_classes: int, mesh):
    """The jitted vmapped trainer of one group of models, cached per (recipe, classes, mesh)."""
    model_config = ml_collections.ConfigDict(json.loads(model_config_json))

    def train_group(keys, x, y, masks):
        return jax.vmap(lambda k, w: mlp.fit(model_config, k, x, y, w, num_classes))(keys, masks)

    models, rep = sharding.over_every(mesh), sharding.replicated(mesh)
    return sharding.jit(train_group, (models, rep, rep, models), models)


def query_losses(model_config, params_M, x_QxF, y_Q, num_classes, batch: int = 50) -> jax.Array:
    """losses_MxQ: cross-entropy of every stacked model on every query, ``batch`` models at a
    time (0: as many as one model's evaluation fits in the memory available)."""
    x_QxF = jnp.asarray(x_QxF, jnp.float32)
    m = jax.tree.leaves(params_M)[0].shape[0]
    per_model = resources.classifier_retrain_bytes(
        x_QxF.shape[0], x_QxF.shape[1], model_config.hidden, num_classes, 0
    )
    batch = resources.models_at_once(batch, m, per_model, what="query losses")
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
    x, y = jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N)
    group = group_size(
        model_config,
        x.shape,
        splits.num_classes,
        config.num_models,
        config.models_per_batch,
        mesh,
        "ground truth",
    )
    logging.info(
        "ground truth: retraining %d models on %.0f%% subsets (vmapped, %d at a time)",
        config.num_models,
        100 * config.alpha,
        group,
    )
    t0 = time.time()
    params = retrain_many(
        model_config, keys, x, y, masks, splits.num_classes, mesh, group, "ground truth"
    )
    losses = query_losses(
        model_config,
        params,
        jnp.asarray(splits.query.x_NxF),
        jnp.asarray(splits.query.y_N),
        splits.num_classes,
        group,
    )
    out = {"masks_MxN": masks, "losses_MxQ": distributed.to_host(losses)}
    logging.info(
        "ground truth: done in %.1fs; mean query loss %.4f", time.time() - t0, float(losses.mean())
    )
    if path:
        checkpoint.save_arrays(path, **out)
    return out
