"""Similarity baselines: a training row helps a query row as much as the two look alike.

Registered names, their task kinds and config keys (``default_config(kind)``); every score
is a similarity of (query row, training row), higher = more similar = helps:

- ``"featsim"`` (classifier): cosine similarity of the penultimate-layer features
  (``task.features``). ``chunk=4096``: rows per feature forward pass.
- ``"repsim"`` (decoder): cosine similarity of the mean-pooled final hidden states (after
  the final norm, averaged over real tokens). ``chunk=64``: rows per forward pass.
- ``"tfidf"`` (decoder): cosine similarity of scikit-learn TF-IDF vectors (sublinear tf) of
  the rows' decoded text (``task.tokenizer``). ``analyzer``: "word", "char_wb" or "auto"
  (char_wb for a character tokenizer, word otherwise); ``word_ngrams`` / ``char_ngrams``:
  n-gram ranges of each analyzer.
- ``"bm25"`` (decoder): Okapi BM25 (``k1``, ``b``) of each query's terms against each
  training row, with Lucene's non-negative idf ln(1 + (N - df + 0.5) / (df + 0.5)); a query
  term counts once per occurrence. Terms come from the same analyzers as ``tfidf`` (default:
  words).
- ``"minilm"`` (decoder): cosine similarity of the all-MiniLM-L6-v2 sentence embeddings
  (``models.bert.embed``: mean-pooled, unit length) of the rows' decoded text. ``path``: the
  model folder (config.json, model.safetensors, tokenizer.json; ``python -m
  experiments.fetch_minilm`` writes it); ``max_len``: MiniLM tokens kept per text (longer
  texts are truncated); ``batch``: texts per jitted forward pass.

The text methods read decoded text, which only decoder rows have. scikit-learn, scipy,
``tokenizers`` and the BERT stack are imported by the functions that use them, so importing
the method registry stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stride_jax import methods
from stride_jax.optional import require

_EPS = 1e-12
_TEXT = dict(analyzer="auto", word_ngrams=(1, 2), char_ngrams=(2, 5))
DEFAULTS = {
    "featsim": dict(chunk=4096),
    "repsim": dict(chunk=64),
    "tfidf": dict(_TEXT),
    "bm25": dict(_TEXT, analyzer="word", word_ngrams=(1, 1), k1=1.5, b=0.75),
    "minilm": dict(path="runs/models/minilm", max_len=128, batch=64),
}
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_LEN_MULTIPLE = 16  # MiniLM's padded lengths are rounded up to this: few compiled shapes


def default_config(name: str, kind: str | None = None) -> ml_collections.ConfigDict:
    """The default config block of one of this module's methods (the same for every kind)."""
    del kind
    if name not in DEFAULTS:
        raise ValueError(f"unknown similarity baseline {name!r}; known: {sorted(DEFAULTS)}")
    return ml_collections.ConfigDict(DEFAULTS[name])


# --- the shared cosine ---------------------------------------------------------------------


def unit_rows(x_NxD) -> jax.Array:
    """Rows scaled to unit length (a zero row stays zero)."""
    x_NxD = jnp.asarray(x_NxD, jnp.float32)
    return x_NxD / jnp.maximum(jnp.linalg.norm(x_NxD, axis=1, keepdims=True), _EPS)


def cosine_scores(q_QxD, train_NxD) -> np.ndarray:
    """scores_QxN: cosine similarity of every query row with every training row."""
    s = jnp.matmul(unit_rows(q_QxD), unit_rows(train_NxD).T, precision=jax.lax.Precision.HIGHEST)
    return methods.as_scores(s)


def _embedding_method(name: str, embed, kinds: tuple[str, ...]) -> None:
    """Register ``name``: ``embed(task, state, rows, cfg) -> E_RxD``, scored by cosine."""

    def fit(task, cfg):
        state = {}
        state["train_NxD"] = embed(task, state, task.train, cfg)
        return state

    def score(task, state, query, cfg):
        return cosine_scores(embed(task, state, query, cfg), state["train_NxD"])

    _register(name, fit, score, kinds)


def _register(name: str, fit, score, kinds: tuple[str, ...]) -> None:
    """Register ``name`` with its defaults (also used when ``cfg`` is None)."""

    def fit_(task, cfg=None):
        return fit(task, default_config(name) if cfg is None else cfg)

    def score_(task, state, query, cfg=None):
        return score(task, state, query, default_config(name) if cfg is None else cfg)

    defaults = functools.partial(default_config, name)
    methods.register(name, fit_, score_, default_config=defaults, kinds=kinds)


# --- FeatSim (classifier) and RepSim (decoder) ---------------------------------------------


def penultimate_features(task, rows, chunk: int) -> jax.Array:
    """f_NxH: the classifier's penultimate features of ``rows``, ``chunk`` rows at a time."""
    fn = jax.jit(lambda x: task.features(x))
    x_NxF = np.asarray(rows.x_NxF, np.float32)
    parts = [fn(jnp.asarray(x_NxF[i : i + chunk])) for i in range(0, x_NxF.shape[0], chunk)]
    return jnp.concatenate(parts, axis=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def mean_hidden(graphdef, params, tokens_NxL, attn_NxL, chunk: int) -> jax.Array:
    """h_NxD: a decoder's final-norm hidden states averaged over each row's real tokens."""
    from stride_jax.models import transformer

    def pooled(rows):
        tok, attn = rows
        h0 = transformer.hidden_at(graphdef, params, tok[None], attn[None], 0)
        hn_LxD = transformer.normed_from(graphdef, params, h0, attn[None], 0)[0]
        w_L = attn.astype(hn_LxD.dtype)
        return (hn_LxD * w_L[:, None]).sum(0) / jnp.maximum(w_L.sum(), 1.0)

    return jax.lax.map(pooled, (tokens_NxL, attn_NxL), batch_size=chunk)


def _featsim_embed(task, state, rows, cfg):
    return penultimate_features(task, rows, int(cfg.chunk))


def _repsim_embed(task, state, rows, cfg):
    data = task.arrays(rows)
    return mean_hidden(task.graphdef, task.params, data["tokens"], data["attn"], int(cfg.chunk))


# --- text: TF-IDF and BM25 (decoder) -------------------------------------------------------


def texts(tokenizer, blocks) -> list[str]:
    """Each row's real tokens decoded to text."""
    tokens, attn = np.asarray(blocks.tokens_NxL), np.asarray(blocks.attn_mask_NxL) > 0
    return [tokenizer.decode(t[m].tolist()) for t, m in zip(tokens, attn, strict=True)]


def _rows_text(task, rows) -> list[str]:
    if task.tokenizer is None:
        raise ValueError("text-similarity baselines need task.tokenizer to decode rows to text")
    return texts(task.tokenizer, rows)


def analyzer_kwargs(tokenizer, cfg) -> dict:
    """Vectorizer keywords (analyzer, ngram_range) for ``cfg.analyzer``."""
    from stride_jax.data.tokenizer import CharTokenizer

    kind = cfg.analyzer
    if kind == "auto":
        kind = "char_wb" if isinstance(tokenizer, CharTokenizer) else "word"
    if kind not in ("word", "char_wb"):
        raise ValueError(f"analyzer must be 'auto', 'word' or 'char_wb', got {cfg.analyzer!r}")
    ngrams = cfg.word_ngrams if kind == "word" else cfg.char_ngrams
    return dict(analyzer=kind, ngram_range=tuple(int(n) for n in ngrams))


def _tfidf_fit(task, cfg):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True, **analyzer_kwargs(task.tokenizer, cfg))
    return {"vectorizer": vec, "train": vec.fit_transform(_rows_text(task, task.train))}


def _tfidf_score(task, state, query, cfg):
    q = state["vectorizer"].transform(_rows_text(task, query))  # unit rows: dot = cosine
    return methods.as_scores((q @ state["train"].T).toarray())


def bm25_weights(counts_NxV, k1: float, b: float):
    """Sparse W_NxV: BM25 term weight of every (row, term), so scores = q_counts @ W^T."""
    import scipy.sparse as sp

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
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(**analyzer_kwargs(task.tokenizer, cfg))
    counts = vec.fit_transform(_rows_text(task, task.train))
    return {"vectorizer": vec, "w_NxV": bm25_weights(counts, float(cfg.k1), float(cfg.b))}


def _bm25_score(task, state, query, cfg):
    q_QxV = state["vectorizer"].transform(_rows_text(task, query)).astype(np.float64)
    return methods.as_scores((q_QxV @ state["w_NxV"].T).toarray())


# --- MiniLM sentence embeddings (decoder) --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A BERT sentence encoder (``models.bert``) and its ``tokenizers.Tokenizer``."""

    config: object
    graphdef: object
    params: object
    tokenizer: object


def load_encoder(path) -> Encoder:
    """The encoder in ``path`` (config.json, model.safetensors, tokenizer.json)."""
    from stride_jax.models import bert

    tokenizers = require("tokenizers", "the minilm sentence encoder")

    path = pathlib.Path(path)
    absent = [name for name in _MINILM_FILES if not (path / name).is_file()]
    if absent:
        raise FileNotFoundError(
            f"sentence encoder folder {str(path)!r} lacks {', '.join(absent)}; run "
            "`python -m experiments.fetch_minilm` (writes runs/models/minilm) or set the "
            "method's `path` to a folder holding a BERT checkpoint and its tokenizer.json"
        )
    config, graphdef, params = bert.load_bert(path)
    tokenizer = tokenizers.Tokenizer.from_file(str(path / _MINILM_FILES[2]))
    return Encoder(config, graphdef, params, tokenizer)


def tokenize(tokenizer, strings: list[str], max_len: int):
    """(ids_NxL, mask_NxL) int32, right-padded with id 0 (masked out), truncated to max_len;
    L is the longest encoding rounded up to a multiple of 16 (at most max_len)."""
    tokenizers = require("tokenizers", "the minilm sentence encoder")
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
    from stride_jax.models import bert

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


def _minilm_embed(task, state, rows, cfg):
    strings = _rows_text(task, rows)  # refuses a task without a tokenizer before any loading
    if "encoder" not in state:
        state["encoder"] = load_encoder(cfg.path)
    return embed_texts(state["encoder"], strings, int(cfg.max_len), int(cfg.batch))


# --- registration ----------------------------------------------------------------------------

_embedding_method("featsim", _featsim_embed, ("classifier",))
_embedding_method("repsim", _repsim_embed, ("decoder",))
_embedding_method("minilm", _minilm_embed, ("decoder",))
_register("tfidf", _tfidf_fit, _tfidf_score, ("decoder",))
_register("bm25", _bm25_fit, _bm25_score, ("decoder",))
