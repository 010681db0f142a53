"""Text data: JSONL errors, tokenizers, chunking and loss masks, Shakespeare and chit-chat."""

import json

import numpy as np
import pytest
from ml_collections import ConfigDict

from stride_jax.data import (
    CharTokenizer,
    DataError,
    HFTokenizer,
    Record,
    load_chitchat,
    load_jsonl,
    load_shakespeare,
    load_text,
    load_tokenizer,
    pack,
    tokenize,
)
from stride_jax.data.corpora import chitchat_records, shakespeare_text

SENTENCES = [
    "the cat sat on the mat",
    "the dog ate my homework",
    "a cat and a dog are friends",
    "where is the cat now?",
]


def write(tmp_path, content, name="data.jsonl"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


BAD_JSONL = {
    "invalid_json": ('{"text": "a"}\n{"text": "b"\n', 2, "invalid JSON"),
    "non_object": ('{"text": "a"}\n["text", "b"]\n', 2, "expected a JSON object"),
    "no_keys": ('{"text": "a"}\n\n{"id": 7}\n', 3, "missing key 'text'"),
    "missing_response": ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', 2, "'response'"),
    "mixed_styles": (
        '{"text": "a"}\n{"text": "b"}\n{"prompt": "c", "response": "d"}\n',
        3,
        "style",
    ),
    "both_styles_in_line": ('{"text": "a", "response": "b"}\n', 1, "both"),
    "non_string": ('{"text": "a"}\n{"text": 3}\n', 2, "must be a string"),
    "non_string_prompt": ('{"prompt": ["x"], "response": "b"}\n', 1, "'prompt' must be a string"),
    "empty_text": ('{"text": "a"}\n{"text": "  "}\n', 2, "'text' is empty"),
    "empty_response": ('{"prompt": "a", "response": ""}\n', 1, "'response' is empty"),
    "duplicate_id": (
        '{"id": "x", "text": "a"}\n{"text": "b"}\n{"id": "x", "text": "c"}\n',
        3,
        "duplicate id 'x'",
    ),
    "duplicate_default_id": ('{"text": "a"}\n{"id": 0, "text": "b"}\n', 2, "duplicate id 0"),
    "bad_id_type": ('{"id": 1.5, "text": "a"}\n', 1, "'id' must be a string or integer"),
    "not_utf8": (b'{"text": "a"}\n{"text": "caf\xe9"}\n', 2, "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_names_file_and_line(tmp_path, case):
    content, lineno, problem = BAD_JSONL[case]
    path = write(tmp_path, content)
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert f"{path}:{lineno}:" in str(err.value)
    assert problem in str(err.value)


def test_empty_and_missing_jsonl(tmp_path):
    path = write(tmp_path, "\n  \n")
    with pytest.raises(DataError, match="is empty"):
        load_jsonl(path)
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(str(tmp_path / "nope.jsonl"))


def test_jsonl_both_styles_and_ids(tmp_path):
    recs = load_jsonl(write(tmp_path, '{"text": "hello"}\n\n{"text": "bye", "id": "b"}\n'))
    assert recs == [Record(0, "hello"), Record("b", "bye")]
    recs = load_jsonl(write(tmp_path, '{"prompt": "", "response": "x", "id": 5, "meta": 1}\n'))
    assert recs == [Record(5, "x", "")]


def test_char_tokenizer_round_trip_and_errors(tmp_path):
    tok = CharTokenizer.from_corpus("hello world")
    assert tok.chars == tuple(sorted(set("hello world")))
    assert tok.pad_id == 0 and tok.eos_id is None and tok.vocab_size == len(tok.chars) + 1
    ids = tok.encode("low hole")
    assert 0 not in ids and tok.decode(ids) == "low hole"
    with pytest.raises(DataError, match="'z' at position 2"):
        tok.encode("loz")
    unk = CharTokenizer.from_corpus("hello world", use_unk=True)
    assert unk.encode("z") == [unk.unk_id] and unk.vocab_size == tok.vocab_size + 1
    tok.save(str(tmp_path / "char.json"))
    assert load_tokenizer(str(tmp_path / "char.json")) == tok


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A tiny byte-level BPE trained here, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return tok, str(path)


def test_hf_tokenizer_matches_tokenizers_library(bpe, tmp_path):
    ref, path = bpe
    tok = HFTokenizer.from_file(path, eos_token="<|endoftext|>")
    assert tok.eos_id == ref.token_to_id("<|endoftext|>") == tok.pad_id
    assert tok.vocab_size == ref.get_vocab_size()
    for text in SENTENCES + ["the mat, my friends! élan"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == ref.decode(ids) == text
    tok.save(str(tmp_path / "saved.json"))
    back = load_tokenizer(str(tmp_path / "saved.json"))
    assert (back.eos_id, back.pad_id, back.bos_id) == (tok.eos_id, tok.pad_id, None)
    assert back.encode(SENTENCES[2]) == tok.encode(SENTENCES[2])
    with pytest.raises(DataError, match="not in the tokenizer's vocabulary"):
        HFTokenizer.from_file(path, eos_token="</s>")


def test_gguf_and_hf_directory_tokenizers(bpe, tmp_path):
    """A GGUF file written here with the BPE's vocabulary and merges loads via transformers."""
    import gguf

    ref, _ = bpe
    model = json.loads(ref.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    eos = ref.token_to_id("<|endoftext|>")
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_name("tiny")
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i == eos else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) for m in model["merges"]])
    w.add_eos_token_id(eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(path)
    assert tok.eos_id == eos and tok.bos_id is None
    for text in SENTENCES:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").save_pretrained(
        str(tmp_path / "hf")
    )
    from_dir = load_tokenizer(str(tmp_path / "hf"))
    assert from_dir.eos_id == eos and from_dir.encode(SENTENCES[1]) == tok.encode(SENTENCES[1])


def reference_sum(blocks, scores_QxN):
    out = np.zeros((scores_QxN.shape[0], blocks.num_examples))
    for n in range(len(blocks)):
        for q in range(scores_QxN.shape[0]):
            out[q, blocks.example_id_N[n]] += scores_QxN[q, n]
    return out


def test_tokenize_chunks_map_back_to_examples():
    texts = ["ab", "abcdefghijklmnopq", "abcdefgh", "abcdefghi"]
    tok = CharTokenizer.from_corpus("".join(texts))
    blocks = tokenize([Record(f"k{i}", t) for i, t in enumerate(texts)], tok, 4)
    # rows per example: 1, 4 (+ a tail "q" alone, no target: dropped), 2, 2 (+ "i" dropped)
    assert blocks.example_id_N.tolist() == [0, 1, 1, 1, 1, 2, 2, 3, 3]
    assert blocks.example_keys == ("k0", "k1", "k2", "k3")
    for e, text in enumerate(texts):
        rows = np.flatnonzero(blocks.example_id_N == e)
        real = np.concatenate([blocks.tokens_NxL[r][blocks.attn_mask_NxL[r] == 1] for r in rows])
        assert tok.decode(real) == text[: len(real)] and len(text) - len(real) <= 1
    assert blocks.tokens_NxL[0].tolist() == tok.encode("ab") + [tok.pad_id] * 2
    assert blocks.attn_mask_NxL[0].tolist() == [1, 1, 0, 0]
    assert blocks.loss_mask_NxL[0].tolist() == [0, 1, 0, 0]
    assert (blocks.loss_mask_NxL[:, 0] == 0).all()
    scores = np.random.default_rng(0).normal(size=(3, len(blocks)))
    np.testing.assert_allclose(blocks.sum_to_examples(scores), reference_sum(blocks, scores))
    sub = blocks.subset([6, 2, 5])
    assert sub.example_keys == ("k2", "k1") and sub.example_id_N.tolist() == [0, 1, 0]
    np.testing.assert_allclose(
        sub.sum_to_examples(scores[:, [6, 2, 5]]), reference_sum(sub, scores[:, [6, 2, 5]])
    )
    with pytest.raises(DataError, match=r"shape \(Q, 9\)"):
        blocks.sum_to_examples(scores[:, :3])


def test_sft_loss_mask_covers_exactly_the_response(bpe):
    ref, path = bpe
    tok = HFTokenizer.from_file(path, eos_token="<|endoftext|>")
    recs = [
        Record(i, s.split(" ", 1)[1], s.split(" ", 1)[0] + " ") for i, s in enumerate(SENTENCES)
    ]
    blocks = tokenize(recs, tok, 32)
    assert len(blocks) == len(recs)
    for rec, tokens, loss in zip(recs, blocks.tokens_NxL, blocks.loss_mask_NxL, strict=True):
        assert tok.decode(tokens[loss == 1]) == rec.response + "<|endoftext|>"
        n_prompt = len(tok.encode(rec.prompt))
        assert (loss[:n_prompt] == 0).all()


def test_sft_chunks_without_response_are_dropped():
    tok = CharTokenizer.from_corpus("abcdefghijklmnopqrstuvwxyz")
    rec = Record("long", "xyz", "abcdefghij")  # 10 prompt chars then 3 response chars
    blocks = tokenize([rec], tok, 4)  # chunks abcd efgh ijxy z: only ijxy has a target
    assert len(blocks) == 1 and blocks.example_id_N.tolist() == [0]
    masked = "".join(
        tok.decode(t[m == 1]) for t, m in zip(blocks.tokens_NxL, blocks.loss_mask_NxL, strict=True)
    )
    assert masked == "xy"  # "z" opens its own chunk, without context there: dropped
    with pytest.raises(DataError, match="'late' .* no response token"):
        tokenize([Record("late", "i", "abcdefgh")], tok, 4)


def test_pack_blocks_are_consecutive():
    text = "abcdefghijklmnopqrstuvwxyz"
    tok = CharTokenizer.from_corpus(text)
    blocks = pack(text, tok, 8)
    assert len(blocks) == 3 and blocks.example_keys == (0, 1, 2)
    assert [tok.decode(t) for t in blocks.tokens_NxL] == ["abcdefgh", "ijklmnop", "qrstuvwx"]
    assert blocks.loss_mask_NxL.sum() == 3 * 7 and blocks.attn_mask_NxL.all()


def test_shakespeare_splits():
    text = shakespeare_text()
    assert 400_000 < len(text) < 600_000 and "Gutenberg" not in text
    s = load_shakespeare(block_len=64, n_train=300, n_val=50, n_query=40, seed=0)
    assert (len(s.train), len(s.val), len(s.query)) == (300, 50, 40)
    keys = [set(b.example_keys) for b in (s.train, s.val, s.query)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    for blocks in (s.train, s.query):
        for row, k in zip(blocks.tokens_NxL[:5], blocks.example_keys[:5], strict=True):
            assert s.tokenizer.decode(row) == text[64 * k : 64 * (k + 1)]
    again = load_shakespeare(block_len=64, n_train=300, n_val=50, n_query=40, seed=0)
    np.testing.assert_array_equal(again.train.tokens_NxL, s.train.tokens_NxL)
    assert again.query.example_keys == s.query.example_keys
    other = load_shakespeare(block_len=64, n_train=300, n_val=50, n_query=40, seed=1)
    assert other.query.example_keys != s.query.example_keys
    with pytest.raises(DataError, match="exceeds the 8689 shakespeare blocks"):
        load_shakespeare(n_train=8689)


def test_chitchat_pairs():
    import chitchat_dataset

    recs = chitchat_records()
    assert len(recs) > 100_000
    assert all(r.response.strip() and r.prompt.strip() for r in recs)
    conv_id, conv = next(iter(chitchat_dataset.Dataset().items()))
    turn = [" ".join(u["text"] for u in m) for m in conv["messages"][:2]]
    assert recs[0] == Record(f"{conv_id}:0", turn[1], turn[0] + "\n")
    a, b = load_chitchat(50, 10, 20, seed=3), load_chitchat(50, 10, 20, seed=3)
    assert a == b and (len(a.train), len(a.val), len(a.query)) == (50, 10, 20)
    assert {r.key for r in a.train}.isdisjoint(r.key for r in a.query)
    assert load_chitchat(50, 10, 20, seed=4).query != a.query


def test_load_text_dispatch(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}: ", "response": "ab" * (i + 1)}) for i in range(12)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    c = ConfigDict(
        dict(
            name="jsonl",
            path=path,
            tokenizer="char",
            block_len=6,
            n_train=None,
            n_val=2,
            n_query=3,
            seed=0,
        )
    )
    s = load_text(c)
    assert (s.train.num_examples, s.val.num_examples, s.query.num_examples) == (7, 2, 3)
    assert len(s.train) > 7  # long examples were chunked ...
    keys = [set(b.example_keys) for b in (s.train, s.val, s.query)]
    assert set().union(*keys) == set(range(12)) and sum(map(len, keys)) == 12  # ... not split
    c.update(name="shakespeare", block_len=32, n_train=20, n_val=0, n_query=5)
    s = load_text(c)
    assert (len(s.train), len(s.query), s.val) == (20, 5, None)
    c.name = "tinystories"
    with pytest.raises(DataError, match="unknown text data set 'tinystories'"):
        load_text(c)
