"""Embedding-similarity baseline for language models: MiniLM sentence embeddings of row text.

Registered name ``"minilm"``: the score of (query row, training row) is the cosine similarity
of the all-MiniLM-L6-v2 embeddings (``bert.embed``: mean-pooled, L2-normalised) of the two
rows' decoded text (real tokens only, ``task.tokenizer``); higher = more similar = helps.
Config keys (``default_config("minilm")``): ``path``, the model folder (config.json,
model.safetensors, tokenizer.json; ``python -m experiments.fetch_minilm`` writes it);
``max_len``, MiniLM tokens kept per text (longer texts are truncated); ``batch``, texts per
jitted forward pass.
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections
import numpy as np
import tokenizers

from stride_jax.baselines import base
from stride_jax.baselines.lm_simple import texts
from stride_jax.models import bert

DEFAULTS = {"minilm": dict(path="runs/models/minilm", max_len=128, batch=64)}
_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_LEN_MULTIPLE = 16  # padded lengths are rounded up to this, so few shapes are compiled


def default_config(name: str = "minilm") -> ml_collections.ConfigDict:
    """The default config block of this module's method (see module docstring)."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown LM embedding baseline {name!r}; known: {sorted(DEFAULTS)}")
    return ml_collections.ConfigDict(DEFAULTS[name])


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A BERT sentence encoder and its tokenizer."""

    config: bert.BertConfig
    graphdef: object
    params: object
    tokenizer: tokenizers.Tokenizer


def load_encoder(path) -> Encoder:
    """The encoder in ``path`` (config.json, model.safetensors, tokenizer.json)."""
    path = pathlib.Path(path)
    absent = [name for name in _FILES if not (path / name).is_file()]
    if absent:
        raise FileNotFoundError(
            f"sentence encoder folder {str(path)!r} lacks {', '.join(absent)}; run "
            "`python -m experiments.fetch_minilm` (writes runs/models/minilm) or set the "
            "method's `path` to a folder holding a BERT checkpoint and its tokenizer.json"
        )
    config, graphdef, params = bert.load_bert(path)
    return Encoder(config, graphdef, params, tokenizers.Tokenizer.from_file(str(path / _FILES[2])))


def tokenize(tokenizer: tokenizers.Tokenizer, strings: list[str], max_len: int):
    """(ids_NxL, mask_NxL) int32, right-padded with id 0 (masked out), truncated to max_len;
    L is the longest encoding rounded up to a multiple of 16 (at most max_len)."""
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # own copy: settings change
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)
    encodings = tokenizer.encode_batch(strings)
    longest = max((len(e.ids) for e in encodings), default=1)
    L = min(-(-longest // _LEN_MULTIPLE) * _LEN_MULTIPLE, max_len)
    ids_NxL, mask_NxL = np.zeros((2, len(strings), L), np.int32)
    for i, e in enumerate(encodings):
        ids_NxL[i, : len(e.ids)] = e.ids
        mask_NxL[i, : len(e.ids)] = e.attention_mask
    return ids_NxL, mask_NxL


def embed_texts(encoder: Encoder, strings: list[str], max_len: int, batch: int) -> np.ndarray:
    """E_NxD float32 unit rows, ``batch`` texts per call of the jitted ``bert.embed``.

    Texts are sorted by length so each batch is padded only to its own longest (rounded up
    to a multiple of 16): few compiled shapes, little compute spent on padding.
    """
    if not 0 < max_len <= encoder.config.max_len:
        raise ValueError(f"max_len must be in 1..{encoder.config.max_len}, got {max_len}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ids_NxL, mask_NxL = tokenize(encoder.tokenizer, strings, max_len)
    n, b = len(strings), max(min(batch, len(strings)), 1)
    len_N = mask_NxL.sum(1)
    order = np.argsort(len_N, kind="stable")
    out_NxD = np.zeros((n, encoder.config.d_model), np.float32)
    for start in range(0, n, b):
        rows = order[start : start + b]
        L = min(-(-int(len_N[rows].max()) // _LEN_MULTIPLE) * _LEN_MULTIPLE, ids_NxL.shape[1])
        pad = ((0, b - len(rows)), (0, 0))  # whole batches only: one compiled shape per L
        ids_BxL, mask_BxL = (np.pad(a[rows, :L], pad) for a in (ids_NxL, mask_NxL))
        e_BxD = bert.embed(encoder.graphdef, encoder.params, ids_BxL, mask_BxL)
        out_NxD[rows] = np.asarray(e_BxD)[: len(rows)]
    return out_NxD


def _embed_rows(task, state, blocks, cfg) -> np.ndarray:
    return embed_texts(
        state["encoder"], texts(task.tokenizer, blocks), int(cfg.max_len), int(cfg.batch)
    )


def _fit(task, cfg):
    if task.tokenizer is None:
        raise ValueError("the minilm baseline needs task.tokenizer to decode rows to text")
    state = {"encoder": load_encoder(cfg.path)}
    state["train_NxD"] = _embed_rows(task, state, task.train, cfg)
    return state


def _score(task, state, query, cfg):
    q_QxD = _embed_rows(task, state, query, cfg).astype(np.float64)
    return base.as_scores(q_QxD @ state["train_NxD"].astype(np.float64).T)


base.register_lm("minilm", _fit, _score)
