"""Representation, text-similarity and random baselines for language models.

Registered names and their config keys (``default_config(name)``); higher = more similar =
helps the query, one score per (query row, training row):

- ``"repsim"``: cosine similarity of the mean-pooled final hidden states (after the final
  norm, averaged over real tokens). ``chunk``: rows per forward pass.
- ``"tfidf"``: cosine similarity of scikit-learn TF-IDF vectors (sublinear tf) of the rows'
  decoded text (``task.tokenizer``). ``analyzer``: "word", "char_wb" or "auto" (char_wb
  for a character tokenizer, word otherwise); ``word_ngrams`` / ``char_ngrams``: n-gram
  ranges of each analyzer.
- ``"bm25"``: Okapi BM25 (``k1``, ``b``) of each query's terms against each training row,
  with Lucene's non-negative idf ln(1 + (N - df + 0.5) / (df + 0.5)); a query term counts
  once per occurrence. Terms come from the same analyzers as ``tfidf`` (default: words).
- ``"random"``: i.i.d. standard normal scores from ``seed``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

from stride_jax.baselines import base
from stride_jax.data.tokenizer import CharTokenizer
from stride_jax.models import transformer

_TEXT = dict(analyzer="auto", word_ngrams=(1, 2), char_ngrams=(2, 5))
DEFAULTS = {
    "repsim": dict(chunk=64),
    "tfidf": dict(_TEXT),
    "bm25": dict(_TEXT, analyzer="word", word_ngrams=(1, 1), k1=1.5, b=0.75),
    "random": dict(seed=0),
}


def default_config(name: str) -> ml_collections.ConfigDict:
    """The default config block of one of this module's methods (see module docstring)."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown LM simple baseline {name!r}; known: {sorted(DEFAULTS)}")
    return ml_collections.ConfigDict(DEFAULTS[name])


# --- RepSim --------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def mean_hidden(graphdef, params, tokens_NxL, attn_NxL, chunk: int) -> jax.Array:
    """h_NxD: final-norm hidden states averaged over each row's real tokens, unit length."""

    def pooled(rows):
        tok, attn = rows
        h0 = transformer.hidden_at(graphdef, params, tok[None], attn[None], 0)
        hn_LxD = transformer.normed_from(graphdef, params, h0, attn[None], 0)[0]
        w_L = attn.astype(hn_LxD.dtype)
        return (hn_LxD * w_L[:, None]).sum(0) / jnp.maximum(w_L.sum(), 1.0)

    h_NxD = jax.lax.map(pooled, (tokens_NxL, attn_NxL), batch_size=chunk)
    return h_NxD / jnp.maximum(jnp.linalg.norm(h_NxD, axis=1, keepdims=True), 1e-12)


def _hidden(task, blocks, cfg):
    data = task.data(blocks)
    return mean_hidden(task.graphdef, task.params, data["tokens"], data["attn"], int(cfg.chunk))


def _repsim_fit(task, cfg):
    return {"train_NxD": _hidden(task, task.train, cfg)}


def _repsim_score(task, state, query, cfg):
    q_QxD = _hidden(task, query, cfg)
    s = jnp.matmul(q_QxD, state["train_NxD"].T, precision=jax.lax.Precision.HIGHEST)
    return base.as_scores(s)


# --- text: TF-IDF and BM25 -----------------------------------------------------------------


def texts(tokenizer, blocks) -> list[str]:
    """Each row's real tokens decoded to text."""
    tokens, attn = np.asarray(blocks.tokens_NxL), np.asarray(blocks.attn_mask_NxL) > 0
    return [tokenizer.decode(t[m].tolist()) for t, m in zip(tokens, attn, strict=True)]


def analyzer_kwargs(tokenizer, cfg) -> dict:
    """Vectorizer keywords (analyzer, ngram_range) for ``cfg.analyzer``."""
    kind = cfg.analyzer
    if kind == "auto":
        kind = "char_wb" if isinstance(tokenizer, CharTokenizer) else "word"
    if kind not in ("word", "char_wb"):
        raise ValueError(f"analyzer must be 'auto', 'word' or 'char_wb', got {cfg.analyzer!r}")
    ngrams = cfg.word_ngrams if kind == "word" else cfg.char_ngrams
    return dict(analyzer=kind, ngram_range=tuple(int(n) for n in ngrams))


def _tfidf_fit(task, cfg):
    vec = TfidfVectorizer(sublinear_tf=True, **analyzer_kwargs(task.tokenizer, cfg))
    return {"vectorizer": vec, "train": vec.fit_transform(texts(task.tokenizer, task.train))}


def _tfidf_score(task, state, query, cfg):
    q = state["vectorizer"].transform(texts(task.tokenizer, query))
    return base.as_scores((q @ state["train"].T).toarray())


def bm25_weights(counts_NxV, k1: float, b: float):
    """Sparse W_NxV: BM25 term weight of every (row, term), so scores = q_counts @ W^T."""
    counts = sp.csr_matrix(counts_NxV, dtype=np.float64)
    n = counts.shape[0]
    df_V = np.bincount(counts.indices, minlength=counts.shape[1])
    idf_V = np.log1p((n - df_V + 0.5) / (df_V + 0.5))
    len_N = np.asarray(counts.sum(axis=1)).ravel()
    norm_N = k1 * (1.0 - b + b * len_N / max(len_N.mean(), 1e-12))
    row = np.repeat(np.arange(n), np.diff(counts.indptr))
    tf = counts.data
    w = sp.csr_matrix(counts)
    w.data = idf_V[counts.indices] * tf * (k1 + 1.0) / (tf + norm_N[row])
    return w


def _bm25_fit(task, cfg):
    vec = CountVectorizer(**analyzer_kwargs(task.tokenizer, cfg))
    counts = vec.fit_transform(texts(task.tokenizer, task.train))
    return {"vectorizer": vec, "w_NxV": bm25_weights(counts, float(cfg.k1), float(cfg.b))}


def _bm25_score(task, state, query, cfg):
    q_QxV = state["vectorizer"].transform(texts(task.tokenizer, query)).astype(np.float64)
    return base.as_scores((q_QxV @ state["w_NxV"].T).toarray())


# --- Random --------------------------------------------------------------------------------


def _random_fit(task, cfg):
    return {}


def _random_score(task, state, query, cfg):
    shape = (len(query), len(task.train))
    return base.as_scores(jax.random.normal(jax.random.key(int(cfg.seed)), shape))


base.register_lm("repsim", _repsim_fit, _repsim_score)
base.register_lm("tfidf", _tfidf_fit, _tfidf_score)
base.register_lm("bm25", _bm25_fit, _bm25_score)
base.register_lm("random", _random_fit, _random_score)
