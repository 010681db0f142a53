"""What the job does differently per task kind, in one place: loading the data, building the
base model (as a ``Task``), its statistics, and the ground-truth retrains.

- classifier: features from ``data.load`` (digits, MNIST-5k, a user's .npz); the library MLP
  trained with its full-batch recipe (``config.model``); the ground truth's M retrains run in
  one jitted, mesh-sharded call (``groundtruth``).
- decoder: token blocks from ``data.corpora``; a decoder trained from scratch or fine-tuned
  from a pre-trained start (``model.source``: 'scratch' | 'pretrain' | 'hf' | 'gguf') with
  ``config.train``; ground-truth retrains start from the same point and also score the
  validation rows, so tuning needs no retraining of its own (``task.retrain_losses``, groups
  of models vmapped, resumable from a partial file).

Every stage output is cached in the workdir and tied to the config slice that makes it.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from stride_jax import checkpoint, tasks
from stride_jax.data import corpora, load
from stride_jax.errors import ConfigError
from stride_jax.eval import groundtruth
from stride_jax.job import cache
from stride_jax.job.config import AUTO_BLOCK_LEN, method_block
from stride_jax.job.pretrain import decoder_config, pretrain
from stride_jax.methods import datamodel
from stride_jax.models import hf_import, mlp, transformer
from stride_jax.stride import defaults as stride_defaults
from stride_jax.stride import method as stride_method
from stride_jax.stride import subsets
from stride_jax.tasks import decoder_task

# --- data -----------------------------------------------------------------------------------


def resolve(config) -> list[str]:
    """Fill in the automatic settings that need no data (a decoder's ``data.tokenizer='auto'``
    and unset ``data.block_len``) in place; returns one line per value chosen."""
    notes = []
    if config.task != "decoder":
        return notes
    d, mc = config.data, config.model
    if d.tokenizer == "auto":
        d.tokenizer = {"scratch": "char", "pretrain": "pretrained"}.get(mc.source, mc.path)
        notes.append(f"data.tokenizer: auto -> {d.tokenizer!r} (model.source={mc.source!r})")
    if d.block_len is None:
        max_len = start_max_len(config)
        d.block_len = min(max_len, AUTO_BLOCK_LEN)
        notes.append(
            f"data.block_len: auto -> {d.block_len} (the model's max_len {max_len}, "
            f"at most {AUTO_BLOCK_LEN})"
        )
    return notes


def start_max_len(config) -> int:
    """The context length of the model the decoder recipe starts from, read without loading
    its weights (a HF directory's config.json, a GGUF file's metadata)."""
    mc = config.model
    if mc.source == "scratch":
        return int(mc.max_len)
    if mc.source == "pretrain":
        return int(config.pretrain.model.max_len)
    if mc.source == "hf":
        path = os.path.join(mc.path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(
                f"model.path {mc.path!r} has no config.json: model.source='hf' needs a "
                "Hugging Face model directory"
            )
        with open(path) as f:
            try:
                return int(transformer.DecoderConfig.from_hf(json.load(f)).max_len)
            except (ValueError, KeyError) as e:
                raise ConfigError(f"{path}: {e}") from e
    from stride_jax.models import gguf_import

    return int(gguf_import.context_length(mc.path))


def load_data(config, workdir: str):
    """The run's splits. Refuses bad data before any file is written, except that a decoder
    run whose tokenizer is the one pre-trained here (``data.tokenizer='pretrained'``) must
    pre-train first."""
    if config.task == "classifier":
        splits = load(config.data)
        logging.info(
            "data: %s, %d train, %d query, %d classes",
            splits.name,
            len(splits.train),
            len(splits.query),
            splits.num_classes,
        )
        return splits
    data_config = config.data
    if config.data.tokenizer == "pretrained":
        hf_dir = pretrain(config.pretrain, os.path.join(workdir, "pretrained"))
        data_config = ml_collections.ConfigDict(
            dict(config.data.to_dict(), tokenizer=os.path.join(hf_dir, "stride_tokenizer.json"))
        )
    splits = corpora.load_text(data_config)
    logging.info(
        "data: %s, %d train rows (%d examples), %d query rows, block %d, vocab %d",
        splits.name,
        len(splits.train),
        splits.train.num_examples,
        len(splits.query),
        splits.train.block_len,
        splits.tokenizer.vocab_size,
    )
    return splits


def plan(config, splits) -> list[str]:
    """The automatic settings that need the data (STRIDE's T when ``num_subsets=0``), filled
    in place, and every data-dependent check, before any model is trained. Returns one line
    per value chosen (and the sanity warnings are logged)."""
    notes = []
    n = len(splits.train)
    if "stride" in config.methods or config.ablations:
        dc = config.stride.design
        t = stride_method.resolve_num_subsets(dc, n, config.task)  # ConfigError if infeasible
        if not dc.num_subsets:
            dc.num_subsets = t
            rule = stride_defaults.AUTO_RULE[config.task]
            notes.append(
                f"stride.design.num_subsets: auto -> {t} ({rule} with N={n} training "
                f"rows, d={dc.degree})"
            )
    for label in config.methods:  # STRIDE variants: the same design check (T is set at fit)
        name, block = method_block(config, label)
        if label != "stride" and name == "stride":
            stride_method.resolve_num_subsets(block.design, n, config.task)
    if config.task == "classifier":
        _scale_hint(splits.train.x_NxF)
    return notes


# Sanity thresholds: a column whose largest |value| is this many times the median column's
# gets a hint to standardise; a train CE below MEMORISED means the model memorised.
SCALE_RATIO, MEMORISED = 50.0, 0.02


def _scale_hint(x_NxF) -> None:
    """Warn when feature scales differ wildly (the MLP recipe assumes comparable scales)."""
    scale_F = np.abs(np.asarray(x_NxF, np.float64)).max(0)
    live = scale_F[scale_F > 0]
    if live.size < 2:
        return
    ratio = live.max() / np.median(live)
    if ratio > SCALE_RATIO:
        logging.warning(
            "data: feature scales differ by %.0fx (largest |value| per feature %.3g vs median "
            "%.3g): standardise the features ((x - mean) / std per feature, with training-set "
            "statistics) before attribution; the default MLP recipe assumes comparable scales",
            ratio,
            live.max(),
            np.median(live),
        )


def _fit_warnings(stats: dict, num_classes: int | None) -> None:
    """Warn when the base model memorises its training set or barely learns."""
    loss = stats["train_loss"]
    if loss < MEMORISED:
        logging.warning(
            "base model: train loss %.4f: it memorises its training set, so the fidelity loss "
            "and every gradient-based method see almost no signal (LDS suffers); train less "
            "(fewer steps), with more weight decay, or a smaller model",
            loss,
        )
    if num_classes and stats.get("train_accuracy", 1.0) < 1.5 / num_classes:
        logging.warning(
            "base model: train accuracy %.3f is near chance (1/%d classes): it underfits; "
            "check the labels, standardise the features, or train longer",
            stats["train_accuracy"],
            num_classes,
        )


def describe(config, splits) -> dict:
    """The ``dataset`` block of results.json."""
    if config.task == "classifier":
        return {"name": splits.name, "n_train": len(splits.train), "n_query": len(splits.query)}
    return {
        "name": splits.name,
        "n_train_examples": splits.train.num_examples,
        "n_train_rows": len(splits.train),
        "n_query": len(splits.query),
        "block_len": splits.train.block_len,
    }


# --- the base model ---------------------------------------------------------------------------


def base_task(config, splits, mesh, workdir: str):
    """``(task, stats, recipe)``: the base model trained with the kind's recipe (or reloaded
    from ``base_model.npz``) as a ``Task``, its train / query statistics (logged), and the
    config slice it was made from (every later stage's cache is keyed by it too)."""
    if config.task == "classifier":
        task, like, recipe = _classifier_task(config, splits, mesh)
    else:
        task, like, recipe = _decoder_task(config, splits, mesh, workdir)
    path = cache.guarded(workdir, "base_model.npz", recipe)
    if os.path.exists(path):
        task.params = cache.load_tree(path, like)
        logging.info("base model: reusing %s", path)
    else:
        t0 = time.time()
        task.params = jax.block_until_ready(task.retrain(jax.random.key(task.seed)))
        logging.info("base model: trained in %.1fs", time.time() - t0)
        cache.save_tree(path, task.params)
    stats = _classifier_stats(task, splits) if config.task == "classifier" else _lm_stats(task)
    return task, stats, recipe


def _classifier_task(config, splits, mesh):
    """(the untrained MLP task, its abstract params, the config slice of its recipe)."""
    graphdef, abstract = mlp.abstract(config.model, splits.train.x_NxF.shape[1], splits.num_classes)
    task = tasks.mlp_task(config.model, graphdef, None, splits, mesh=mesh)
    recipe = {"data": config.data.to_dict(), "model": config.model.to_dict()}
    return task, abstract, recipe


STATS_CHUNK = 65536  # rows per forward pass of the base-model statistics


def _classifier_stats(task, splits) -> dict:
    """Mean cross-entropy and accuracy on the training and query sets."""
    stats = {}
    for split, ds in (("train", splits.train), ("query", splits.query)):
        loss = hits = 0.0
        for lo in range(0, len(ds.y_N), STATS_CHUNK):  # bounded memory at any N
            logits = task.logits(jnp.asarray(ds.x_NxF[lo : lo + STATS_CHUNK]))
            y = ds.y_N[lo : lo + STATS_CHUNK]
            loss += float(mlp.cross_entropy(logits, y).sum())
            hits += float((logits.argmax(-1) == y).sum())
        stats[f"{split}_loss"] = loss / len(ds.y_N)
        stats[f"{split}_accuracy"] = hits / len(ds.y_N)
    logging.info(
        "base model: train loss %.4f acc %.4f | query loss %.4f acc %.4f",
        stats["train_loss"],
        stats["train_accuracy"],
        stats["query_loss"],
        stats["query_accuracy"],
    )
    _fit_warnings(stats, splits.num_classes)
    return stats


def _start_model(config, splits, workdir: str):
    """(architecture, graphdef, params0) the decoder recipe starts from."""
    mc = config.model
    if mc.source == "scratch":
        cfg = decoder_config(mc, splits.tokenizer.vocab_size)
        return (cfg, *transformer.build(cfg, jax.random.key(mc.seed)))
    if mc.source == "pretrain":
        return hf_import.load_hf(pretrain(config.pretrain, os.path.join(workdir, "pretrained")))
    if mc.source == "hf":
        return hf_import.load_hf(mc.path)
    if mc.source == "gguf":
        from stride_jax.models import gguf_import

        return gguf_import.load_gguf(mc.path)
    raise ConfigError(f"model.source must be scratch, pretrain, hf or gguf, got {mc.source!r}")


def _decoder_task(config, splits, mesh, workdir: str):
    """(the untrained decoder task, its start params, the config slice of its recipe); refuses
    a model whose vocabulary or context the data do not fit."""
    cfg, graphdef, params0 = _start_model(config, splits, workdir)
    if cfg.vocab_size < splits.tokenizer.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's "
            f"({splits.tokenizer.vocab_size}): model and tokenizer do not match"
        )
    tok = splits.tokenizer
    for name in ("pad_id", "eos_id", "bos_id"):
        i = getattr(tok, name, None)
        if i is not None and not 0 <= i < cfg.vocab_size:
            raise ConfigError(
                f"the tokenizer's {name}={i} is outside the model's vocabulary of "
                f"{cfg.vocab_size}: model and tokenizer do not match"
            )
    if splits.train.block_len > cfg.max_len:
        raise ConfigError(
            f"data.block_len={splits.train.block_len} exceeds the model's max_len {cfg.max_len}: "
            "lower it, or leave it unset (automatic)"
        )
    c = config
    recipe = {"data": c.data.to_dict(), "model": c.model.to_dict(), "train": c.train.to_dict()}
    if c.model.source == "pretrain":
        recipe["pretrain"] = c.pretrain.to_dict()
    task = decoder_task.DecoderTask(
        graphdef=graphdef,
        params=None,
        train=splits.train,
        query=splits.query,
        mesh=mesh,
        seed=c.train.seed,
        model_config=cfg,
        recipe=c.train,
        params0=params0,
        tokenizer=splits.tokenizer,
    )
    return task, params0, recipe


def _lm_stats(task) -> dict:
    """Mean row losses of the base decoder (and, on the queries, of its start)."""
    stats = {
        "train_loss": float(task.row_losses(task.train).mean()),
        "query_loss": float(task.row_losses(task.query).mean()),
        "start_query_loss": float(task.row_losses(task.query, task.params0).mean()),
        "num_params": int(sum(x.size for x in jax.tree.leaves(task.params))),
    }
    logging.info(
        "base model: train loss %.4f, query loss %.4f (before training: %.4f), %d params",
        *stats.values(),
    )
    _fit_warnings(stats, None)
    return stats


# --- ground truth -----------------------------------------------------------------------------


def ground_truth(config, task, splits, workdir: str) -> dict:
    """``{"masks_MxN", "losses_MxQ"}`` (and, for a decoder with validation rows,
    ``"losses_val_MxV"``) of the M ground-truth retrains; cached in groundtruth.npz."""
    if config.task == "classifier":
        cache.guarded(workdir, "groundtruth.npz", _classifier_gt_slice(config))
        return groundtruth.build(config.groundtruth, config.model, splits, task.mesh, workdir)
    return _decoder_gt_seeds(config, task, splits, workdir, config.groundtruth.seed, "groundtruth")


def ceiling_losses(config, task, splits, workdir: str, gt) -> dict:
    """The ground truth's subsets retrained with other seeds (from ``groundtruth.ceiling_seed``):
    the noise ceiling's prediction, ``{"losses_MxQ"}`` (decoders: the dict ``ground_truth``
    returns, with ``"losses_by_seed_SxMxQ"``); cached."""
    if config.task != "classifier":
        ceiling = config.groundtruth.ceiling_seed
        return _decoder_gt_seeds(config, task, splits, workdir, ceiling, "noise_ceiling")
    gc = config.groundtruth
    slice_ = {**_classifier_gt_slice(config), "ceiling_seed": gc.ceiling_seed}
    path = cache.guarded(workdir, "noise_ceiling.npz", slice_)
    if os.path.exists(path):
        return {"losses_MxQ": checkpoint.load_arrays(path)["losses_MxQ"]}
    logging.info(
        "noise ceiling: retraining the %d ground-truth subsets with other seeds", gc.num_models
    )
    key = jax.random.key(gc.ceiling_seed)
    losses = datamodel.ceiling_losses(task, gt["masks_MxN"], key, splits.query, gc.models_per_batch)
    checkpoint.save_arrays(path, losses_MxQ=losses)
    return {"losses_MxQ": losses}


def _classifier_gt_slice(config) -> dict:
    """The settings that change the classifier ground truth's numbers (not batching)."""
    gt = config.groundtruth
    return {
        "data": config.data.to_dict(),
        "model": config.model.to_dict(),
        "groundtruth": {"num_models": gt.num_models, "alpha": gt.alpha, "seed": gt.seed},
    }


# Training seed j > 0 of a decoder retrain set keys its init and batches with this offset.
SEED_OFFSET = 100


def _decoder_gt_seeds(config, task, splits, workdir: str, seed: int, stem: str) -> dict:
    """``_decoder_gt`` for each of ``groundtruth.seeds`` training seeds of the same masks
    (files ``<stem>.npz``, ``<stem>_seed1.npz``, ...): the losses are averaged over the seeds,
    and ``"losses_by_seed_SxMxQ"`` keeps each seed's (the single-seed noise ceiling)."""
    runs = [
        _decoder_gt(
            config,
            task,
            splits,
            workdir,
            seed + 1000 + SEED_OFFSET * j,
            f"{stem}.npz" if j == 0 else f"{stem}_seed{j}.npz",
        )
        for j in range(config.groundtruth.seeds)
    ]
    out = dict(runs[0])
    for key in ("losses_MxQ", "losses_val_MxV"):
        if key in out:
            out[key] = np.mean([r[key] for r in runs], axis=0).astype(np.float32)
    out["losses_by_seed_SxMxQ"] = np.stack([r["losses_MxQ"] for r in runs])
    return out


def _decoder_gt(config, task, splits, workdir: str, seed: int, name: str) -> dict:
    """Masks (M x examples) and query (and validation) row losses of M decoder retrains with
    init/batch keys from ``seed``; cached as ``name`` and resumable from its partial file."""
    c, gt = config, config.groundtruth
    partial = os.path.join(workdir, name + ".partial.npz")
    path = cache.guarded(
        workdir,
        name,
        {
            "data": c.data.to_dict(),
            "model": c.model.to_dict(),
            "train": c.train.to_dict(),
            "gt": {"num_models": gt.num_models, "alpha": gt.alpha, "seed": gt.seed},
            "seed": seed,
        },
        partial,
    )
    if os.path.exists(path):
        return checkpoint.load_arrays(path)
    masks = subsets.retention_masks(
        jax.random.key(gt.seed), gt.num_models, splits.train.num_examples, gt.alpha
    )
    keys = jax.random.split(jax.random.key(seed), gt.num_models)
    what = "ground truth" if name.startswith("groundtruth") else "noise ceiling"
    what += f" ({name})" if "_seed" in name else ""
    logging.info("%s: retraining %d decoders", what, gt.num_models)
    # Validation rows are scored by the same retrains, so tuning (job.tune) needs no
    # retraining of its own and never sees the reported queries.
    rows = [task.arrays(splits.query)]
    if splits.val is not None:
        rows.append(task.arrays(splits.val))
    evaluated = jax.tree.map(lambda *a: jnp.concatenate(a), *rows)
    t0 = time.time()
    done = checkpoint.load_arrays(partial)["losses"] if os.path.exists(partial) else ()

    def on_group(losses, stop):  # progress (rate, ETA) is logged by retrain_losses
        checkpoint.save_arrays(partial, losses=losses)

    weights = task.example_weights(np.asarray(masks))
    losses = decoder_task.retrain_losses(
        task, keys, weights, evaluated, gt.models_per_batch, on_group, done, label=what
    )
    q = len(splits.query)
    logging.info(
        "ground truth: %s in %.1fs, mean query loss %.4f",
        name,
        time.time() - t0,
        losses[:, :q].mean(),
    )
    out = {"masks_MxN": np.asarray(masks), "losses_MxQ": losses[:, :q]}
    if splits.val is not None:
        out["losses_val_MxV"] = losses[:, q:]
    checkpoint.save_arrays(path, **out)
    checkpoint.remove(partial)  # finished: the resume file has served its purpose
    return out
