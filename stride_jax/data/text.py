"""Text data for language-model attribution: JSONL records and fixed-length token blocks.

A ``Record`` is one training example: a ``prompt`` (context, never a loss target) then a
``response`` (the tokens that count). Pre-training text is a record with an empty prompt.
``tokenize`` cuts records into ``TokenBlocks`` rows; long examples become several chunks that
remember their example, so chunk-level scores sum back to examples as in the STRIDE paper.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from stride_jax.data.dataset import DataError
from stride_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Record:
    """One example: ``prompt`` ("" for plain text) is context, ``response`` is the target."""

    key: str | int
    response: str
    prompt: str = ""


def _parse_line(where: str, obj) -> tuple[str, str, str]:
    """(style, prompt, response) of one JSON value, or a ``DataError`` naming ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_text, has_sft = "text" in obj, ("prompt" in obj or "response" in obj)
    if has_text and has_sft:
        raise DataError(f"{where}: has both 'text' and 'prompt'/'response'; use one style")
    if not has_text and not has_sft:
        raise DataError(f"{where}: missing key 'text' (or 'prompt' and 'response')")
    keys = ("text",) if has_text else ("prompt", "response")
    for k in keys:
        if k not in obj:
            raise DataError(f"{where}: missing key {k!r} (SFT lines need 'prompt' and 'response')")
        if not isinstance(obj[k], str):
            raise DataError(f"{where}: {k!r} must be a string, got {type(obj[k]).__name__}")
    target = keys[-1]
    if not obj[target].strip():
        raise DataError(f"{where}: {target!r} is empty")
    if has_text:
        return "text", "", obj["text"]
    return "sft", obj["prompt"], obj["response"]


def load_jsonl(path: str) -> list[Record]:
    """Records from a JSONL file, one JSON object per line (blank lines are skipped).

    Either every line is ``{"text": ...}`` (pre-training: every token is a target) or every
    line is ``{"prompt": ..., "response": ...}`` (SFT: only response tokens are targets).
    ``"id"`` (string or integer) is optional; it defaults to the record's 0-based index.
    Errors name the file and the 1-based line number.
    """
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} is not a file")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records, seen, style, first = [], {}, None, None
    for lineno, raw in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "save the file as UTF-8"
            ) from e
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from e
        line_style, prompt, response = _parse_line(where, obj)
        if style is None:
            style, first = line_style, lineno
        elif line_style != style:
            raise DataError(
                f"{where}: {line_style!r}-style line in a file whose line {first} is "
                f"{style!r}-style; use one style per file"
            )
        key = obj.get("id", len(records))
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise DataError(f"{where}: 'id' must be a string or integer, got {type(key).__name__}")
        if key in seen:
            raise DataError(f"{where}: duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = lineno
        records.append(Record(key, response, prompt))
    if not records:
        raise DataError(f"data file {path!r} is empty (no JSON lines)")
    return records


@dataclasses.dataclass(frozen=True)
class TokenBlocks:
    """Fixed-length rows of tokens, each a whole example or one chunk of one.

    ``tokens_NxL`` (int32) is right-padded; ``attn_mask_NxL`` (int32) is 1 on real tokens.
    ``loss_mask_NxL`` (float32) is 1 where the token at position t is a prediction target that
    counts (t >= 1, a real token, a response token), so the loss is cross-entropy of
    ``logits[:, :-1]`` against ``tokens[:, 1:]`` weighted by ``loss_mask[:, 1:]``.
    ``example_id_N`` maps each row to its example; ``example_keys[e]`` is that example's id.
    """

    tokens_NxL: np.ndarray
    loss_mask_NxL: np.ndarray
    attn_mask_NxL: np.ndarray
    example_id_N: np.ndarray
    example_keys: tuple

    def __post_init__(self):
        tokens = np.asarray(self.tokens_NxL)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise DataError(f"tokens_NxL must be 2-D with L >= 2, got shape {tokens.shape}")
        for name in ("loss_mask_NxL", "attn_mask_NxL"):
            if np.shape(getattr(self, name)) != tokens.shape:
                raise DataError(
                    f"{name} has shape {np.shape(getattr(self, name))}, expected {tokens.shape}"
                )
        ids = np.asarray(self.example_id_N)
        if ids.shape != tokens.shape[:1]:
            raise DataError(f"example_id_N has shape {ids.shape}, expected ({tokens.shape[0]},)")
        keys = tuple(self.example_keys)
        if ids.size and (ids.min() < 0 or ids.max() >= len(keys)):
            raise DataError(f"example_id_N must lie in 0..{len(keys) - 1}")
        if len(np.unique(ids)) != len(keys):
            raise DataError(
                f"{len(keys)} example keys but rows cover {len(np.unique(ids))} examples"
            )
        object.__setattr__(self, "tokens_NxL", tokens.astype(np.int32))
        object.__setattr__(self, "loss_mask_NxL", np.asarray(self.loss_mask_NxL, np.float32))
        object.__setattr__(self, "attn_mask_NxL", np.asarray(self.attn_mask_NxL, np.int32))
        object.__setattr__(self, "example_id_N", ids.astype(np.int32))
        object.__setattr__(self, "example_keys", keys)

    def __len__(self) -> int:
        return int(self.tokens_NxL.shape[0])

    block_len = property(lambda self: int(self.tokens_NxL.shape[1]), doc="L, tokens per row.")

    @property
    def num_examples(self) -> int:
        return len(self.example_keys)

    def subset(self, idx) -> TokenBlocks:
        """Rows ``idx``; examples are renumbered 0.. in order of their first row."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < -len(self) or idx.max() >= len(self))):
            raise DataError(
                f"subset indices must be 1-D in [0, {len(self)}), got shape {idx.shape}"
            )
        old = self.example_id_N[idx]
        uniq, first, inverse = np.unique(old, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return TokenBlocks(
            self.tokens_NxL[idx],
            self.loss_mask_NxL[idx],
            self.attn_mask_NxL[idx],
            rank[inverse.reshape(-1)],
            tuple(self.example_keys[int(e)] for e in uniq[order]),
        )

    def concat(self, other: TokenBlocks) -> TokenBlocks:
        """These rows followed by ``other``'s, whose examples follow these (ids shifted)."""
        if other.block_len != self.block_len:
            raise DataError(
                f"cannot append rows of {other.block_len} tokens to rows of {self.block_len}"
            )
        cat = lambda a, b: np.concatenate([a, b])  # noqa: E731
        return TokenBlocks(
            cat(self.tokens_NxL, other.tokens_NxL),
            cat(self.loss_mask_NxL, other.loss_mask_NxL),
            cat(self.attn_mask_NxL, other.attn_mask_NxL),
            cat(self.example_id_N, other.example_id_N + self.num_examples),
            self.example_keys + other.example_keys,
        )

    def sum_to_examples(self, scores_QxN) -> np.ndarray:
        """Sum row (chunk) scores over the rows of each example: ``(Q, N) -> (Q, E)``."""
        scores_QxN = np.asarray(scores_QxN)
        if scores_QxN.ndim != 2 or scores_QxN.shape[1] != len(self):
            raise DataError(f"scores must have shape (Q, {len(self)}), got {scores_QxN.shape}")
        out_ExQ = np.zeros(
            (self.num_examples, scores_QxN.shape[0]), np.result_type(scores_QxN, np.float32)
        )
        np.add.at(out_ExQ, self.example_id_N, scores_QxN.T)
        return out_ExQ.T


def _example_ids(rec: Record, tokenizer: Tokenizer, add_eos: bool) -> tuple[list[int], list[int]]:
    """(ids, is_target) of one record: [BOS] prompt response [EOS], targets on response+EOS."""
    head = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(rec.prompt)
    tail = tokenizer.encode(rec.response)
    if not tail:
        raise DataError(f"example {rec.key!r}: response encodes to no tokens")
    if add_eos and tokenizer.eos_id is not None:
        tail.append(tokenizer.eos_id)
    return head + tail, [0] * len(head) + [1] * len(tail)


def tokenize(records, tokenizer: Tokenizer, block_len: int, add_eos: bool = True) -> TokenBlocks:
    """Records -> ``TokenBlocks`` of ``block_len`` tokens per row.

    Each example is [BOS] + prompt + response + [EOS] (BOS/EOS where the tokenizer has them;
    EOS is a target). Short examples are right-padded with ``pad_id``; long ones are cut into
    consecutive non-overlapping chunks, the last one padded. The first token of a row has no
    context, so it is never a target. Chunks with no target token (e.g. a chunk of an SFT
    example holding only prompt) are dropped; an example left with none is an error.
    """
    if block_len < 2:
        raise DataError(f"block_len must be >= 2, got {block_len}")
    records = list(records)
    if not records:
        raise DataError("no records to tokenize")
    rows, masks, example_ids = [], [], []
    for e, rec in enumerate(records):
        ids, target = _example_ids(rec, tokenizer, add_eos)
        kept = 0
        for start in range(0, len(ids), block_len):
            mask = target[start : start + block_len]
            mask[0] = 0
            if not any(mask):
                continue
            rows.append(ids[start : start + block_len])
            masks.append(mask)
            example_ids.append(e)
            kept += 1
        if not kept:
            raise DataError(
                f"example {rec.key!r} ({len(ids)} tokens) has no response token with context in "
                f"any block of {block_len}; shorten its prompt or raise block_len"
            )
    n = len(rows)
    tokens = np.full((n, block_len), tokenizer.pad_id, np.int32)
    loss = np.zeros((n, block_len), np.float32)
    attn = np.zeros((n, block_len), np.int32)
    for i, (row, mask) in enumerate(zip(rows, masks, strict=True)):
        tokens[i, : len(row)] = row
        loss[i, : len(row)] = mask
        attn[i, : len(row)] = 1
    keys = tuple(r.key for r in records)
    return TokenBlocks(tokens, loss, attn, np.asarray(example_ids), keys)


def pack(text: str, tokenizer: Tokenizer, block_len: int) -> TokenBlocks:
    """Pre-training style: ``text`` tokenized once and cut into consecutive blocks of
    ``block_len`` tokens, each its own example (keyed by block index); the partial tail is
    dropped so every row is full."""
    if block_len < 2:
        raise DataError(f"block_len must be >= 2, got {block_len}")
    ids = np.asarray(tokenizer.encode(text), np.int32)
    n = len(ids) // block_len
    if n == 0:
        raise DataError(f"text has {len(ids)} tokens, fewer than one block of {block_len}")
    tokens = ids[: n * block_len].reshape(n, block_len)
    loss = np.ones((n, block_len), np.float32)
    loss[:, 0] = 0.0
    return TokenBlocks(tokens, loss, np.ones_like(tokens), np.arange(n), tuple(range(n)))
