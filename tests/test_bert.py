"""BERT encoder and the ``minilm`` baseline: parity with transformers' PyTorch BertModel (the
independent reference) on tiny random checkpoints, numpy cosines, clear refusals; the real
all-MiniLM-L6-v2 in a slow test."""

import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from stride_jax import methods, tasks
from stride_jax.data import corpora
from stride_jax.methods import similarity as lm_embed
from stride_jax.models import bert, transformer

MINILM = pathlib.Path(__file__).resolve().parents[1] / "runs" / "models" / "minilm"
hidden_states = jax.jit(bert.hidden_states, static_argnums=0)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _char_tokenizer() -> tokenizers.Tokenizer:
    """A BERT-style WordPiece tokenizer whose pieces are single (lower-case) characters."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-&$()[]"))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars + ["##" + c for c in chars])}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    return tok


def _torch_bert(vocab_size: int, seed: int = 0):
    """A random transformers BertModel; every parameter (biases, norms too) perturbed."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """(folder with config.json + model.safetensors + tokenizer.json, the torch model)."""
    tok = _char_tokenizer()
    model = _torch_bert(tok.get_vocab_size())
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path, model


def _torch_hidden(model, ids_BxL, mask_BxL, types_BxL=None) -> np.ndarray:
    torch = pytest.importorskip("torch")
    as_long = lambda a: None if a is None else torch.as_tensor(np.asarray(a, np.int64))  # noqa: E731
    with torch.no_grad():
        out = model(
            input_ids=as_long(ids_BxL),
            attention_mask=as_long(mask_BxL),
            token_type_ids=as_long(types_BxL),
        )
    return out.last_hidden_state.numpy()


def _np_pool(h_BxLxD, mask_BxL) -> np.ndarray:
    w = np.asarray(mask_BxL, np.float64)[..., None]
    e = (np.asarray(h_BxLxD, np.float64) * w).sum(1) / w.sum(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _batch(vocab_size, B=3, L=12, seed=0):
    """Random ids and token types, right-padded to lengths L, 7, 3."""
    rng = np.random.default_rng(seed)
    mask_BxL = (np.arange(L)[None] < np.array([L, 7, 3])[:B, None]).astype(np.int32)
    return rng.integers(0, vocab_size, (B, L)), mask_BxL, rng.integers(0, 2, (B, L))


def test_hidden_states_and_embeddings_match_torch(tiny_dir):
    path, model = tiny_dir
    cfg, gd, params = bert.load_bert(path)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (32, 2, 4, 48)
    ids, mask, types = _batch(cfg.vocab_size)
    real = mask > 0
    for t in (None, types):
        ours = np.asarray(hidden_states(gd, params, ids, mask, t))
        ref = _torch_hidden(model, ids, mask, t)
        assert np.abs(ours - ref)[real].max() < 1e-4
    e_BxD = np.asarray(bert.embed(gd, params, ids, mask))
    np.testing.assert_allclose(e_BxD, _np_pool(_torch_hidden(model, ids, mask), mask), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(e_BxD, axis=1), 1.0, atol=1e-6)
    # Padding never leaks into real rows: each row alone, unpadded, embeds the same.
    for i, n in enumerate(mask.sum(1)):
        alone = bert.embed(gd, params, ids[i : i + 1, :n], mask[i : i + 1, :n])
        np.testing.assert_allclose(np.asarray(alone)[0], e_BxD[i], atol=1e-5)


def test_load_checks_tensors_and_config(tiny_dir):
    path, _ = tiny_dir
    hf_config = json.loads((path / "config.json").read_text())
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    _, gd, params = bert.from_state_dict(hf_config, tensors)
    prefixed = {"bert." + n: t for n, t in tensors.items()}
    prefixed["cls.predictions.bias"] = np.zeros(hf_config["vocab_size"], np.float32)
    _, _, params2 = bert.from_state_dict(hf_config, prefixed)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), params, params2)))

    name = "encoder.layer.1.attention.self.key.weight"
    with pytest.raises(ValueError, match=f"missing 1 tensor.*{name}"):
        bert.from_state_dict(hf_config, {n: t for n, t in tensors.items() if n != name})
    with pytest.raises(ValueError, match=rf"{name}: expected shape \(32, 32\), got \(32, 16\)"):
        bert.from_state_dict(hf_config, {**tensors, name: tensors[name][:, :16]})
    with pytest.raises(ValueError, match="unexpected tensor.*encoder.layer.2.foo"):
        bert.from_state_dict(hf_config, {**tensors, "encoder.layer.2.foo": tensors[name]})
    with pytest.raises(ValueError, match="hidden_act 'relu' unsupported"):
        bert.from_state_dict({**hf_config, "hidden_act": "relu"}, tensors)
    with pytest.raises(ValueError, match="exceeds max_len=64"):
        bert.embed(gd, params, np.zeros((1, 65), np.int32), np.ones((1, 65), np.int32))
    with pytest.raises(FileNotFoundError, match="nowhere: no config.json"):
        bert.load_bert(path / "nowhere")


@pytest.fixture(scope="module")
def tiny_task():
    sp = corpora.load_shakespeare(block_len=32, n_train=40, n_val=0, n_query=4, seed=0)
    cfg = transformer.DecoderConfig(
        family="gpt2",
        vocab_size=sp.tokenizer.vocab_size,
        d_model=16,
        n_layers=1,
        n_heads=2,
        max_len=32,
    )
    gd, p0 = transformer.build(cfg, jax.random.key(0))
    task = tasks.DecoderTask(
        graphdef=gd,
        params=p0,
        train=sp.train,
        query=sp.query,
        model_config=cfg,
        tokenizer=sp.tokenizer,
    )
    return task, sp.query


def _decoded(tokenizer, blocks) -> list[str]:
    tokens, attn = np.asarray(blocks.tokens_NxL), np.asarray(blocks.attn_mask_NxL)
    return [tokenizer.decode(row[m == 1].tolist()) for row, m in zip(tokens, attn, strict=True)]


def test_minilm_scores_are_cosines_of_reference_embeddings(tiny_dir, tiny_task):
    path, model = tiny_dir
    task, query = tiny_task
    cfg = lm_embed.default_config("minilm")
    cfg.update(path=str(path), max_len=64, batch=16)  # 40 train rows: 3 batches, 1 padded
    method = methods.get("minilm", "decoder")
    state = method.fit(task, cfg)
    scores_QxN = method.score(task, state, query, cfg)
    assert scores_QxN.shape == (len(query), len(task.train)) and scores_QxN.dtype == np.float32

    tok = _char_tokenizer()

    def reference(blocks):  # one text at a time, unpadded, through torch
        out = []
        for text in _decoded(task.tokenizer, blocks):
            ids = np.asarray(tok.encode(text).ids)[None]
            assert ids.shape[1] <= 64
            out.append(_np_pool(_torch_hidden(model, ids, np.ones_like(ids)), np.ones_like(ids)))
        return np.concatenate(out)

    ref_QxN = reference(query) @ reference(task.train).T
    np.testing.assert_allclose(scores_QxN, ref_QxN, atol=1e-5)

    rows = task.train.subset(np.array([3, 17]))
    self_scores = method.score(task, state, rows, cfg)
    np.testing.assert_array_equal(self_scores.argmax(1), [3, 17])
    np.testing.assert_allclose(self_scores[[0, 1], [3, 17]], 1.0, atol=1e-5)


def test_minilm_missing_folder_says_how_to_fetch(tiny_task, tmp_path):
    task, _ = tiny_task
    cfg = ml_collections.ConfigDict(dict(lm_embed.default_config("minilm"), path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"lacks config.json.*experiments.fetch_minilm"):
        methods.get("minilm", "decoder").fit(task, cfg)


@pytest.mark.slow
@pytest.mark.skipif(not MINILM.is_dir(), reason="run `python -m experiments.fetch_minilm` first")
def test_real_minilm_paraphrases_and_torch_parity():
    transformers = pytest.importorskip("transformers")
    enc = lm_embed.load_encoder(MINILM)
    s = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "A man is riding a horse.",
        "A woman is playing violin.",
    ]
    e_BxD = lm_embed.embed_texts(enc, s, max_len=128, batch=64)
    paraphrase, unrelated = float(e_BxD[0] @ e_BxD[1]), float(e_BxD[2] @ e_BxD[3])
    print(f"paraphrase cos {paraphrase:.4f}, unrelated cos {unrelated:.4f}")
    assert paraphrase > unrelated + 0.3

    ids, mask = lm_embed.tokenize(enc.tokenizer, s, 128)
    assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102  # [CLS] ... [SEP]
    model = transformers.BertModel.from_pretrained(MINILM).eval()
    ref_BxLxD = _torch_hidden(model, ids, mask)
    ours = np.asarray(hidden_states(enc.graphdef, enc.params, ids, mask))
    hidden_diff = float(np.abs(ours - ref_BxLxD)[mask > 0].max())
    embed_diff = float(np.abs(e_BxD - _np_pool(ref_BxLxD, mask)).max())
    print(f"max |hidden - torch| {hidden_diff:.2e}, max |embedding - torch| {embed_diff:.2e}")
    assert hidden_diff < 1e-4 and embed_diff < 1e-4
