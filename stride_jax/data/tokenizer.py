"""Tokenizers behind one small interface: characters, or any Hugging Face ``tokenizers`` model.

``encode`` never adds special tokens: ``tokenize`` places BOS/EOS itself, so a prompt and a
response can be encoded separately and concatenated without a BOS in the middle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Protocol

from stride_jax.data.dataset import DataError
from stride_jax.optional import require


class Tokenizer(Protocol):
    """What the text pipeline needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> str: ...

    def save(self, path: str) -> None: ...


def _save(tok: Tokenizer, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(tok.to_json())


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One id per character: id 0 is padding, then ``chars`` (sorted), then optionally unk.

    Without ``use_unk`` an unseen character is an error rather than silently mapped.
    """

    chars: tuple[str, ...]
    use_unk: bool = False
    pad_id: int = dataclasses.field(default=0, init=False)
    eos_id: None = dataclasses.field(default=None, init=False)
    bos_id: None = dataclasses.field(default=None, init=False)
    _index: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        chars = tuple(self.chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise DataError(f"CharTokenizer chars must be single characters, got {bad[:3]!r}")
        if list(chars) != sorted(set(chars)):
            raise DataError("CharTokenizer chars must be sorted and unique")
        object.__setattr__(self, "chars", chars)
        object.__setattr__(self, "_index", {c: i + 1 for i, c in enumerate(chars)})

    @classmethod
    def from_corpus(cls, text: str, use_unk: bool = False) -> CharTokenizer:
        """The vocabulary of ``text``: every distinct character."""
        if not text:
            raise DataError("cannot build a CharTokenizer from empty text")
        return cls(tuple(sorted(set(text))), use_unk)

    @property
    def unk_id(self) -> int | None:
        return len(self.chars) + 1 if self.use_unk else None

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1 + int(self.use_unk)

    def encode(self, text: str) -> list[int]:
        index, unk = self._index, self.unk_id
        ids = [index.get(c, unk) for c in text]
        if unk is None and None in ids:
            pos = ids.index(None)
            raise DataError(
                f"character {text[pos]!r} at position {pos} is not in the CharTokenizer "
                f"vocabulary ({len(self.chars)} characters); build it from a corpus that "
                "contains it or pass use_unk=True"
            )
        return ids

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if 1 <= i <= len(self.chars):
                out.append(self.chars[i - 1])
            elif i == self.unk_id:
                out.append("\ufffd")
            elif i != self.pad_id:
                raise DataError(
                    f"id {i} is outside the CharTokenizer vocabulary 0..{self.vocab_size - 1}"
                )
        return "".join(out)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": "".join(self.chars), "use_unk": self.use_unk})

    def save(self, path: str) -> None:
        _save(self, path)


def _token_id(tok, token: str | None, what: str) -> int | None:
    if token is None:
        return None
    i = tok.token_to_id(token)
    if i is None:
        raise DataError(f"{what} token {token!r} is not in the tokenizer's vocabulary")
    return i


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with its pad/EOS/BOS ids.

    ``pad_id`` defaults to EOS (else 0): padded positions are masked out, so its value only has
    to be a valid id. ``bos_id`` is set when the model expects a BOS at the start of a text.
    """

    def __init__(self, tokenizer, eos_id=None, pad_id=None, bos_id=None):
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        for name in ("eos_id", "bos_id", "pad_id"):
            i = getattr(self, name)
            if i is not None and not 0 <= i < self.vocab_size:
                raise DataError(f"{name}={i} is outside the vocabulary 0..{self.vocab_size - 1}")

    @classmethod
    def from_file(cls, path: str, eos_token=None, pad_token=None, bos_token=None) -> HFTokenizer:
        """A bare tokenizer.json; name its special tokens (it does not say which they are)."""
        _Tokenizer = require("tokenizers", "a tokenizer.json tokenizer").Tokenizer

        if not os.path.isfile(path):
            raise DataError(f"tokenizer file {path!r} does not exist")
        try:
            tok = _Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise DataError(f"cannot read {path!r} as a tokenizers tokenizer.json: {e}") from e
        ids = [
            _token_id(tok, t, w)
            for t, w in ((eos_token, "eos"), (pad_token, "pad"), (bos_token, "bos"))
        ]
        return cls(tok, *ids)

    @classmethod
    def from_pretrained(cls, path: str, gguf_file: str | None = None) -> HFTokenizer:
        """A Hugging Face model directory, or a GGUF file in it, via ``transformers``.

        Special tokens and whether a BOS is prepended come from the directory's configs (or the
        GGUF metadata); the fast tokenizer's ``tokenizers`` model does the encoding.
        """
        AutoTokenizer = require("transformers", "a Hugging Face tokenizer").AutoTokenizer

        where = os.path.join(path, gguf_file) if gguf_file else path
        if not os.path.exists(where):
            raise DataError(f"tokenizer path {where!r} does not exist")
        try:
            hf = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        except Exception as e:  # noqa: BLE001 - surfaced as one data error naming the path
            raise DataError(f"cannot load a tokenizer from {where!r}: {e}") from e
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise DataError(f"{where!r} has no fast (tokenizers) tokenizer; convert it first")
        probe = hf("a")["input_ids"]
        bos = (
            hf.bos_token_id
            if hf.bos_token_id is not None and probe[:1] == [hf.bos_token_id]
            else None
        )
        return cls(backend, hf.eos_token_id, hf.pad_token_id, bos)

    @classmethod
    def from_gguf(cls, path: str) -> HFTokenizer:
        """The tokenizer stored in a GGUF model file."""
        return cls.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps(
            {
                "type": "hf",
                "tokenizer": json.loads(self.tokenizer.to_str()),
                "eos_id": self.eos_id,
                "pad_id": self.pad_id,
                "bos_id": self.bos_id,
            }
        )

    def save(self, path: str) -> None:
        _save(self, path)


def tokenizer_from_json(text: str) -> Tokenizer:
    """Inverse of ``to_json`` for both tokenizer types."""
    d = json.loads(text)
    kind = d.get("type") if isinstance(d, dict) else None
    try:
        if kind == "char":
            return CharTokenizer(tuple(d["chars"]), d["use_unk"])
        if kind == "hf":
            tokenizers = require("tokenizers", "a saved Hugging Face tokenizer")
            tok = tokenizers.Tokenizer.from_str(json.dumps(d["tokenizer"]))
            return HFTokenizer(tok, d["eos_id"], d["pad_id"], d["bos_id"])
    except KeyError as e:
        raise DataError(f"saved {kind!r} tokenizer is missing key {e}") from e
    raise DataError(f"not a saved stride_jax tokenizer (type {kind!r}; expected 'char' or 'hf')")


SAVED_NAME = "stride_tokenizer.json"  # a tokenizer saved beside a model directory


def check_encodes(tokenizer, text: str, where: str) -> None:
    """Refuse a tokenizer that encodes a sample of the data to nothing or to ids outside its
    own vocabulary (a wrong tokenizer, e.g. a model directory whose tokenizer files are not
    the ones the model was trained with)."""
    sample = text[:200]
    if not sample.strip():
        return
    ids = tokenizer.encode(sample)
    if not ids:
        raise DataError(
            f"the tokenizer ({where}) encodes the data's first example {sample[:40]!r} to no "
            "tokens: it is not a tokenizer for this text (point data.tokenizer at the model's "
            "own tokenizer, or leave it 'auto')"
        )
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise DataError(
            f"the tokenizer ({where}) produced ids {bad[:3]} outside its vocabulary of "
            f"{tokenizer.vocab_size}"
        )


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a path: a GGUF file, a HF model directory, a tokenizer saved with
    ``save``, or a bare tokenizer.json (which names no EOS/pad; pass its directory, or use
    ``HFTokenizer.from_file`` with the token names, to get them). A directory written by this
    project's pre-training (``experiments.pretrain_lm``) holds its tokenizer as
    ``stride_tokenizer.json``, which is used when present."""
    if os.path.isdir(path):
        own = os.path.join(path, SAVED_NAME)
        if os.path.isfile(own):
            return load_tokenizer(own)
        return HFTokenizer.from_pretrained(path)
    if not os.path.isfile(path):
        raise DataError(f"tokenizer path {path!r} does not exist")
    if path.endswith(".gguf"):
        return HFTokenizer.from_gguf(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"tokenizer file {path!r} is not JSON (nor a .gguf file): {e}") from e
    if isinstance(d, dict) and d.get("type") in ("char", "hf"):
        return tokenizer_from_json(json.dumps(d))
    return HFTokenizer.from_file(path)
