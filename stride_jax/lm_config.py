"""Run-config defaults for the language-model LDS job (configs live in experiments/configs).

A pre-training run (``model.source='scratch'``) trains a small decoder on the training blocks;
an SFT run fine-tunes a pre-trained decoder (``model.source`` 'pretrain' | 'hf' | 'gguf') on
prompt/response examples. ``train`` is the one recipe of the base model and of every
ground-truth retrain.
"""

from __future__ import annotations

import ml_collections

from stride_jax.baselines import lm_stride_method


def recipe(**overrides) -> dict:
    r = dict(steps=400, batch=16, lr=3e-3, warmup_steps=40, lr_end_frac=0.1, clip=1.0)
    r.update(weight_decay=0.01, seed=0)
    r.update(overrides)
    return r


def arch(**overrides) -> dict:
    a = dict(family="gpt2", d_model=64, n_layers=2, n_heads=4, max_len=64, seed=0)
    a.update(overrides)
    return a


LM_METHODS = (
    "stride",
    "graddot",
    "tracin",
    "trak1",
    "trak",
    "logra",
    "ekfac",
    "repsim",
    "minilm",
    "tfidf",
    "bm25",
    "random",
)


def pretrain_config() -> ml_collections.ConfigDict:
    """experiments/pretrain_lm.py's config: a character GPT on all of Shakespeare but 200
    held-out blocks (``data.name='textfile'`` with ``data.path`` takes any UTF-8 text file;
    'jsonl' a JSONL corpus; ``data.tokenizer`` 'char' or a tokenizer path for BPE)."""
    return ml_collections.ConfigDict(
        dict(
            data=dict(
                name="shakespeare",
                path="",
                tokenizer="char",
                block_len=64,
                n_train=None,
                n_val=0,
                n_query=200,
                seed=0,
            ),
            model=arch(),
            train=recipe(steps=1000),
            ckpt_every=250,
        )
    )


def base_config() -> ml_collections.ConfigDict:
    from stride_jax import lm_benchmark

    c = ml_collections.ConfigDict()
    c.data = dict(
        name="shakespeare",
        path="",
        tokenizer="char",
        block_len=64,
        n_train=2000,
        n_val=100,
        n_query=100,
        seed=0,
    )
    c.model = dict(source="scratch", path="", **arch())
    # Used only by model.source='pretrain': pre-train a decoder here, then fine-tune it.
    c.pretrain = pretrain_config()
    c.train = recipe()
    c.groundtruth = dict(
        num_models=64, alpha=0.5, seed=1, models_per_batch=16, noise_ceiling=True, ceiling_seed=7
    )
    c.stride = lm_stride_method.default_config()
    c.baselines = lm_benchmark.default_baseline_configs()
    c.methods = ("stride",)
    c.mesh = dict(data=1, ops=1)
    c.lds = dict(n_boot=1000)
    return c
