"""The language-model LDS job: base decoder, ground-truth retrains, methods, results.json.

Pre-training (``model.source='scratch'``): a small decoder trained from a random init on the
training blocks; every ground-truth retrain starts from the SAME init and runs the same recipe
on an alpha-subset of the training examples (its own key draws its batches). SFT
(``model.source`` = 'pretrain' | 'hf' | 'gguf'): a pre-trained decoder (pre-trained here by
``pretrain`` and cached, or imported from a Hugging Face directory / GGUF file) fine-tuned on
prompt/response examples with loss on response tokens only; retrains fine-tune the same
pre-trained start on subsets. Scores are per training row (chunk) and summed back to examples;
the LDS compares them with the retrains' query losses. Stages are cached in the workdir like
the classifier job (benchmark.py), whose evaluation and report this job shares.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from stride_jax import benchmark, checkpoint, profiling, sharding, subsets
from stride_jax.apps import report
from stride_jax.baselines import base, datamodel
from stride_jax.data import DataError, corpora
from stride_jax.data.tokenizer import CharTokenizer, load_tokenizer
from stride_jax.errors import ConfigError
from stride_jax.models import hf_import, lm_train, transformer


@dataclasses.dataclass
class LMContext:
    config: object
    workdir: str
    splits: object
    mesh: object
    task: base.LMTask = None
    base_stats: dict = None


def _arch(c, vocab_size: int) -> transformer.DecoderConfig:
    return transformer.DecoderConfig(
        family=c.family,
        vocab_size=vocab_size,
        d_model=c.d_model,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        max_len=c.max_len,
    )


def pretrain(pc, workdir: str) -> str:
    """Pre-train a decoder from scratch on ``pc.data`` with recipe ``pc.train``; resumable
    (orbax checkpoints every ``pc.ckpt_every`` steps). Writes a Hugging Face directory
    (config.json, model.safetensors, tokenizer) at ``workdir/hf`` and returns its path."""
    if not 0 < pc.ckpt_every <= pc.train.steps or pc.train.steps % pc.ckpt_every:
        raise ConfigError(
            f"pretrain.ckpt_every={pc.ckpt_every} must be > 0 and divide "
            f"pretrain.train.steps={pc.train.steps}"
        )
    out = os.path.join(workdir, "hf")
    checkpoint.guard_config(os.path.join(workdir, "pretrain"), pc.to_dict())
    if os.path.exists(os.path.join(out, "model.safetensors")):
        logging.info("pretrain: reusing %s", out)
        return out
    splits = _pretrain_splits(pc.data)
    cfg = _arch(pc.model, splits.tokenizer.vocab_size)
    graphdef, params0 = transformer.build(cfg, jax.random.key(pc.model.seed))
    data = lm_train.data_arrays(splits.train)
    weights = jnp.ones(len(splits.train))
    state = lm_train.init_state(pc.train, params0)
    state = {**state, "step": jnp.int32(0)}
    ckpts = checkpoint.TrainCheckpoints(os.path.join(workdir, "pretrain_ckpt"))
    try:
        if ckpts.latest_step() is not None:
            state = ckpts.restore(
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
            )
            logging.info("pretrain: resumed from step %d", int(state["step"]))
        step_fn = jax.jit(
            lambda s, k, d, w: lm_train.run_steps(pc.train, graphdef, s, k, d, w, pc.ckpt_every)
        )
        key, t0 = jax.random.key(pc.model.seed + 1), time.time()
        while int(state["step"]) < pc.train.steps:
            state, loss = step_fn(state, key, data, weights)
            step = int(state["step"])
            ckpts.save(step, state)
            logging.info(
                "pretrain step %d/%d  loss %.4f  (%.1f s)",
                step,
                pc.train.steps,
                float(loss.mean()),
                time.time() - t0,
            )
    finally:
        ckpts.close()
    task = base.LMTask(cfg, graphdef, state["params"], splits.train, pc.train, params0)
    stats = {
        "train_loss": float(task.row_losses(splits.train).mean()),
        "query_loss": float(task.row_losses(splits.query).mean()),
    }
    logging.info("pretrain: train loss %.4f, held-out loss %.4f", *stats.values())
    hf_import.save_hf(cfg, state["params"], out)
    splits.tokenizer.save(os.path.join(out, "stride_tokenizer.json"))
    checkpoint.save_json(os.path.join(workdir, "pretrain_stats.json"), stats)
    return out


def _pretrain_splits(dc):
    """Pre-training text; a character vocabulary gets an unknown-character id so that a
    later fine-tuning corpus with characters the pre-training text lacks still encodes."""
    if dc.name not in ("shakespeare", "textfile"):
        return corpora.load_text(dc)
    if dc.name == "shakespeare":
        text = corpora.shakespeare_text()
    else:
        if not os.path.isfile(dc.path):
            raise DataError(f"data.path {dc.path!r} (the text corpus) is not a file")
        with open(dc.path, encoding="utf-8") as f:
            text = f.read()
    if dc.tokenizer == "char":
        tokenizer = CharTokenizer.from_corpus(text, use_unk=True)
    else:
        tokenizer = load_tokenizer(dc.tokenizer)
    return corpora.pack_splits(
        dc.name, text, tokenizer, dc.block_len, dc.n_train, dc.n_val, dc.n_query, dc.seed
    )


def _start_model(ctx: LMContext):
    """(arch, graphdef, params0) the base recipe starts from."""
    mc = ctx.config.model
    if mc.source == "scratch":
        cfg = _arch(mc, ctx.splits.tokenizer.vocab_size)
        return (cfg, *transformer.build(cfg, jax.random.key(mc.seed)))
    if mc.source == "pretrain":
        path = pretrain(ctx.config.pretrain, os.path.join(ctx.workdir, "pretrained"))
        return hf_import.load_hf(path)
    if mc.source == "hf":
        return hf_import.load_hf(mc.path)
    if mc.source == "gguf":
        from stride_jax.models import gguf_import

        return gguf_import.load_gguf(mc.path)
    raise ConfigError(f"model.source must be scratch, pretrain, hf or gguf, got {mc.source!r}")


def base_model(ctx: LMContext) -> dict:
    """Train (or reload) the base decoder with the recipe; logs train / query losses."""
    c = ctx.config
    cfg, graphdef, params0 = _start_model(ctx)
    if cfg.vocab_size < ctx.splits.tokenizer.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's "
            f"({ctx.splits.tokenizer.vocab_size}): model and tokenizer do not match"
        )
    if ctx.splits.train.block_len > cfg.max_len:
        raise ConfigError(f"data.block_len exceeds the model's max_len {cfg.max_len}")
    recipe = {"data": c.data.to_dict(), "model": c.model.to_dict(), "train": c.train.to_dict()}
    if c.model.source == "pretrain":
        recipe["pretrain"] = c.pretrain.to_dict()
    path = benchmark._guarded(ctx.workdir, "base_model.npz", recipe)
    task = base.LMTask(
        cfg,
        graphdef,
        None,
        ctx.splits.train,
        c.train,
        params0,
        ctx.splits.tokenizer,
        ctx.mesh,
        ctx.workdir,
        c.train.seed,
    )
    if os.path.exists(path):
        flat = checkpoint.load_arrays(path)
        leaves, treedef = jax.tree.flatten(params0)
        task.params = jax.tree.unflatten(
            treedef, [jnp.asarray(flat[f"p{i}"]) for i in range(len(leaves))]
        )
    else:
        t0 = time.time()
        task.params = task.retrain(jax.random.key(c.train.seed))
        logging.info("base model: trained in %.1fs", time.time() - t0)
        leaves = jax.tree.leaves(task.params)
        checkpoint.save_arrays(path, **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})
    ctx.task = task
    stats = {
        "train_loss": float(task.row_losses(ctx.splits.train).mean()),
        "query_loss": float(task.row_losses(ctx.splits.query).mean()),
        "start_query_loss": float(task.row_losses(ctx.splits.query, params0).mean()),
        "num_params": int(sum(x.size for x in jax.tree.leaves(task.params))),
    }
    logging.info(
        "base model: train loss %.4f, query loss %.4f (before training: %.4f), %d params",
        *stats.values(),
    )
    return stats


@functools.lru_cache(maxsize=4)
def _retrain_fn(recipe_json: str, graphdef):
    """Jitted: a group of models trained at once (vmap) -> their query-row losses."""
    recipe = ml_collections.ConfigDict(json.loads(recipe_json))

    @jax.jit
    def fn(params0, keys_G, data, weights_GxN, query):
        def one(key, w):
            p = lm_train.fit(recipe, graphdef, params0, key, data, w)
            return lm_train.example_losses(
                graphdef, p, query["tokens"], query["attn"], query["loss_mask"]
            )

        return jax.vmap(one)(keys_G, weights_GxN)

    return fn


def retrain_losses(task: base.LMTask, keys_M, masks_MxE, query, group: int, partial=None):
    """losses_MxQ: query-row losses of M models retrained on example masks. ``query`` is a
    ``TokenBlocks`` or its ``task.data`` arrays (e.g. query and validation rows together).

    Models train ``group`` at a time in one vmapped call; after each group the losses so far
    go to ``partial`` (an .npz path, optional), from which a restarted job resumes.
    """
    weights = jnp.asarray(masks_MxE, jnp.float32)[:, task.train.example_id_N]
    m = weights.shape[0]
    done = (
        checkpoint.load_arrays(partial)["losses"] if partial and os.path.exists(partial) else None
    )
    out = [] if done is None else list(done)
    fn = _retrain_fn(task.recipe.to_json(), task.graphdef)
    q = query if isinstance(query, dict) else task.data(query)
    data, t0 = task.data(), time.time()
    for start in range(len(out), m, group):
        stop = min(start + group, m)
        losses = fn(task.params0, keys_M[start:stop], data, weights[start:stop], q)
        out.extend(np.asarray(jax.device_get(losses), np.float32))
        if partial:
            checkpoint.save_arrays(partial, losses=np.stack(out))
        logging.info("ground truth: %d/%d models (%.1f s)", stop, m, time.time() - t0)
    return np.stack(out)


def ground_truth(ctx: LMContext, seed: int, name: str) -> dict:
    """Masks (M x E) and query losses (M x Q) of M retrains; cached (and resumable)."""
    c = ctx.config
    gt = c.groundtruth
    path = benchmark._guarded(
        ctx.workdir,
        name,
        {
            "data": c.data.to_dict(),
            "model": c.model.to_dict(),
            "train": c.train.to_dict(),
            "gt": {"num_models": gt.num_models, "alpha": gt.alpha, "seed": gt.seed},
            "seed": seed,
        },
    )
    if os.path.exists(path):
        return checkpoint.load_arrays(path)
    masks = subsets.retention_masks(
        jax.random.key(gt.seed), gt.num_models, ctx.splits.train.num_examples, gt.alpha
    )
    keys = jax.random.split(jax.random.key(seed), gt.num_models)
    t0 = time.time()
    logging.info(
        "ground truth: retraining %d decoders (%d at a time)", gt.num_models, gt.models_per_batch
    )
    # Validation rows are scored by the same retrains, so tuning (experiments/tune_lm.py)
    # needs no retraining of its own and never sees the reported queries.
    rows = [ctx.task.data(ctx.splits.query)]
    if ctx.splits.val is not None:
        rows.append(ctx.task.data(ctx.splits.val))
    evaluated = jax.tree.map(lambda *a: jnp.concatenate(a), *rows)
    losses = retrain_losses(
        ctx.task, keys, masks, evaluated, gt.models_per_batch, path + ".partial.npz"
    )
    q = len(ctx.splits.query)
    logging.info(
        "ground truth: %s in %.1fs, mean query loss %.4f",
        name,
        time.time() - t0,
        losses[:, :q].mean(),
    )
    out = {"masks_MxN": np.asarray(masks), "losses_MxQ": losses[:, :q]}
    if ctx.splits.val is not None:
        out["losses_val_MxV"] = losses[:, q:]
    checkpoint.save_arrays(path, **out)
    return out


def run_method(ctx: LMContext, name: str, cfg, workdir: str, query=None):
    """Fit and score one LM method on ``query`` rows (default: the queries); training-row
    scores summed to examples."""
    method = base.get_lm(name)
    task = dataclasses.replace(ctx.task, workdir=workdir)
    query = ctx.splits.query if query is None else query
    with profiling.PeakMemory() as mem:
        t0 = time.time()
        state = profiling.block_all(method.fit(task, cfg))
        t1 = time.time()
        rows = base.as_scores(method.score(task, state, query, cfg))
        t2 = time.time()
    scores = ctx.splits.train.sum_to_examples(rows).astype(np.float32)
    return scores, {"seconds_split": {"fit": t1 - t0, "score": t2 - t1}, "peak_mb": mem.peak_mb}


def context(config, workdir: str):
    """Validate, load data, then the base model and ground truth (reused when cached)."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    data_config = config.data
    if config.data.tokenizer == "pretrained":
        if config.model.source != "pretrain":
            raise ConfigError("data.tokenizer='pretrained' needs model.source='pretrain'")
        hf_dir = pretrain(config.pretrain, os.path.join(workdir, "pretrained"))
        data_config = ml_collections.ConfigDict(
            dict(config.data.to_dict(), tokenizer=os.path.join(hf_dir, "stride_tokenizer.json"))
        )
    splits = corpora.load_text(data_config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.ops)
    ctx = LMContext(config, workdir, splits, mesh)
    logging.info(
        "data: %s, %d train rows (%d examples), %d query rows, block %d, vocab %d",
        splits.name,
        len(splits.train),
        splits.train.num_examples,
        len(splits.query),
        splits.train.block_len,
        splits.tokenizer.vocab_size,
    )
    ctx.base_stats = base_model(ctx)
    return ctx, ground_truth(ctx, config.groundtruth.seed + 1000, "groundtruth.npz")


def run(config, workdir: str) -> dict:
    """The whole LM job; returns and writes ``workdir/results.json``."""
    ctx, gt = context(config, workdir)
    splits = ctx.splits
    checkpoint.save_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
    methods = {}
    for name in config.methods:
        cfg = config.stride if name == "stride" else config.baselines[name]
        sub = os.path.join(workdir, name)
        methods[name] = benchmark._method(
            ctx, name, lambda n=name, c=cfg, d=sub: run_method(ctx, n, c, d), gt, cfg.to_dict()
        )
        methods[name].pop("per_query")
    results = {
        "dataset": {
            "name": splits.name,
            "n_train_examples": splits.train.num_examples,
            "n_train_rows": len(splits.train),
            "n_query": len(splits.query),
            "block_len": splits.train.block_len,
        },
        "ground_truth": {
            "num_models": config.groundtruth.num_models,
            "alpha": config.groundtruth.alpha,
        },
        "base_model": ctx.base_stats,
        "methods": methods,
    }
    if config.groundtruth.noise_ceiling:
        other = ground_truth(ctx, config.groundtruth.ceiling_seed + 1000, "noise_ceiling.npz")
        res = datamodel.retrain_agreement(
            other["losses_MxQ"], gt["losses_MxQ"], n_boot=config.lds.n_boot
        )
        results["noise_ceiling"] = {"lds": res["lds"], "lds_ci95": list(res["ci95"])}
        logging.info("noise ceiling: LDS %.4f [%.4f, %.4f]", res["lds"], *res["ci95"])
    checkpoint.save_json(os.path.join(workdir, "results.json"), results)
    report.write_report(results, workdir)
    return results


def validate(config) -> None:
    """Refuse unknown methods and out-of-range values before any work is done."""
    for name in config.methods:
        base.get_lm(name)
        if name != "stride" and name not in config.baselines:
            raise ConfigError(f"config.baselines has no block for method {name!r}")
    if "minilm" in config.methods:  # fail now, not after the retrains
        path = config.baselines.minilm.path
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ConfigError(
                f"method 'minilm' needs the MiniLM encoder in {path!r}: run "
                "`python -m experiments.fetch_minilm` (or set baselines.minilm.path)"
            )
    if config.data.tokenizer == "char" and config.model.source != "scratch":
        raise ConfigError(
            "data.tokenizer='char' builds a new character vocabulary, which cannot match a "
            f"model from model.source={config.model.source!r}: use 'pretrained' or the "
            "model's tokenizer path"
        )
    s = config.stride
    for key in ("op_chunk", "vocab_chunk", "query_batch", "encode_batch"):
        if not s[key] > 0:
            raise ConfigError(f"config.stride.{key} must be > 0, got {s[key]}")
    if s.stage1.steps % s.stage1.log_every:
        raise ConfigError("config.stride.stage1.steps must be a multiple of stage1.log_every")
    if not 0.0 < config.groundtruth.alpha <= 1.0:
        raise ConfigError(f"groundtruth.alpha must be in (0, 1], got {config.groundtruth.alpha}")
    for key in ("train.steps", "train.batch", "groundtruth.num_models"):
        section, field = key.split(".")
        if not config[section][field] > 0:
            raise ConfigError(f"config.{key} must be > 0, got {config[section][field]}")


def default_baseline_configs() -> ml_collections.ConfigDict:
    """``{name: default config}`` for every registered LM method but STRIDE."""
    out = {}
    for name, method in sorted(base.LM_REGISTRY.items()):
        if name == "stride":
            continue
        module = __import__(method.fit.__module__, fromlist=["default_config"])
        out[name] = module.default_config(name)
    return ml_collections.ConfigDict(out)
