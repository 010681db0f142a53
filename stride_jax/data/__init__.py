"""Data loading: the ``Dataset`` type, embedded defaults and user files."""

from stride_jax.data.dataset import (
    DataError,
    Dataset,
    Splits,
    load,
    load_digits,
    load_npz,
    make_splits,
)

__all__ = ["DataError", "Dataset", "Splits", "load", "load_digits", "load_npz", "make_splits"]

from stride_jax.data.corpora import (  # noqa: E402 - text data, appended to the exports above
    RecordSplits,
    TextSplits,
    load_chitchat,
    load_chitchat_char,
    load_shakespeare,
    load_text,
    split_records,
    tokenize_splits,
)
from stride_jax.data.text import Record, TokenBlocks, load_jsonl, pack, tokenize  # noqa: E402
from stride_jax.data.tokenizer import (  # noqa: E402
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ += [
    "CharTokenizer",
    "HFTokenizer",
    "Record",
    "RecordSplits",
    "TextSplits",
    "TokenBlocks",
    "Tokenizer",
    "load_chitchat",
    "load_chitchat_char",
    "load_jsonl",
    "load_shakespeare",
    "load_text",
    "load_tokenizer",
    "pack",
    "split_records",
    "tokenize",
    "tokenize_splits",
]
