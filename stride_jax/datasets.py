"""Data from a notebook: in-memory arrays or texts as the splits the loaders return.

    splits = stride_jax.datasets.from_arrays(x_train, y_train, x_query, y_query)
    task = stride_jax.tasks.classifier(model, train=(splits.train.x_NxF, splits.train.y_N),
                                       queries=(splits.query.x_NxF, splits.query.y_N), ...)

``from_arrays`` checks exactly what a user .npz file is checked for (``data.make_splits``, the
one validator both go through) and raises ``DataError`` with the same one-line messages.
``from_texts`` tokenizes texts into the decoder's token rows (``data.tokenize``).
"""

from __future__ import annotations

from stride_jax.data.dataset import DataError, Splits, make_splits


def from_arrays(
    x_train,
    y_train,
    x_query,
    y_query,
    ids_train=None,
    name: str = "arrays",
    *,
    x_val=None,
    y_val=None,
) -> Splits:
    """``Splits`` (as ``stride_jax.load_digits`` / ``load_npz`` return) from arrays.

    ``x_*``: examples x features (any real dtype; stored float32, finite); ``y_*``: integer
    class labels 0..C-1 (C = the largest training label + 1, at least 2); ``ids_train``: one
    unique id per training example (default 0..N-1), the ids scores are reported against;
    ``x_val`` / ``y_val``: an optional validation split (tune hyperparameters there). Bad input
    raises ``DataError`` naming the array, e.g. ``x_query has 5 features but x_train has 4``.
    """
    if (x_val is None) != (y_val is None):
        raise DataError("give both x_val and y_val, or neither")
    val = None if x_val is None else (x_val, y_val)
    return make_splits(name, x_train, y_train, x_query, y_query, ids_train=ids_train, val=val)


def _record(split: str, i: int, text):
    from stride_jax.data.text import Record

    if isinstance(text, Record):
        return text
    if isinstance(text, str):
        prompt, response = "", text
    elif isinstance(text, tuple) and len(text) == 2 and all(isinstance(t, str) for t in text):
        prompt, response = text
    else:
        raise DataError(
            f"{split}_texts[{i}] must be a string or a (prompt, response) pair of strings, "
            f"got {type(text).__name__}"
        )
    if not response.strip():
        raise DataError(f"{split}_texts[{i}] has an empty {'response' if prompt else 'text'}")
    return Record(f"{split}{i}", response, prompt)


def from_texts(train_texts, query_texts, tokenizer, block_len: int, name: str = "texts"):
    """``TextSplits`` (train and query token rows + the tokenizer) for a decoder task.

    Each text is a plain string (every token a target), a ``(prompt, response)`` pair (only
    the response's tokens are targets) or a ``data.Record``. ``tokenizer`` is a
    ``data.Tokenizer`` (e.g. ``data.load_tokenizer(path)``, ``data.CharTokenizer``) or
    ``"char"`` (a character vocabulary over all the texts). Texts longer than ``block_len``
    tokens become several rows of one example (``data.tokenize``); scores are per example.
    """
    from stride_jax.data.corpora import RecordSplits, tokenize_splits

    splits = {}
    for split, texts in (("train", train_texts), ("query", query_texts)):
        if isinstance(texts, str):
            raise DataError(f"{split}_texts must be a list of texts, got one string")
        splits[split] = tuple(_record(split, i, t) for i, t in enumerate(texts))
        if not splits[split]:
            raise DataError(f"{split}_texts is empty")
    records = RecordSplits(train=splits["train"], val=(), query=splits["query"])
    return tokenize_splits(name, records, tokenizer, block_len)
