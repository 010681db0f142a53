"""Pre-training a decoder here: the start of an SFT run with ``model.source='pretrain'``
(and ``experiments/pretrain_lm.py``).

``pretrain`` trains a decoder from a random init on ``pc.data`` with recipe ``pc.train``,
checkpointed with orbax every ``pc.ckpt_every`` steps so a killed run resumes to the same
model, and writes a Hugging Face directory that ``models.hf_import`` (and transformers) load.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import logging

from stride_jax import checkpoint
from stride_jax.data import DataError, corpora
from stride_jax.data.tokenizer import CharTokenizer, load_tokenizer
from stride_jax.errors import ConfigError
from stride_jax.models import hf_import, lm_train, transformer
from stride_jax.tasks.decoder_task import DecoderTask


def decoder_config(c, vocab_size: int) -> transformer.DecoderConfig:
    """The architecture of config block ``c`` (a ``model`` block) for a vocabulary size."""
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
    cfg = decoder_config(pc.model, splits.tokenizer.vocab_size)
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
    task = DecoderTask(
        graphdef=graphdef, params=state["params"], train=splits.train, model_config=cfg
    )
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
