"""BERT encoder (Flax NNX) and sentence embeddings: HF BertModel checkpoints, no torch.

Word + absolute position + token-type embeddings, then post-LN layers: h = LN(h + attn(h)),
h = LN(h + proj(gelu(fc(h)))) with exact (erf) GELU; bidirectional attention with a key
padding mask ``mask_BxL`` (1 = real token). ``embed`` is what sentence-transformers does for
all-MiniLM-L6-v2 (modules Transformer -> Pooling(mean) -> Normalize): the last hidden states
averaged over real tokens, then L2-normalised. Weights are read with ``safetensors.numpy``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.optional import require

_INIT = nnx.initializers.normal(0.02)
# Tensors of BertModel / BertFor* checkpoints that the encoder does not use.
_UNUSED_PREFIXES = ("pooler.", "cls.")
_UNUSED_NAMES = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a ``Bert`` encoder (HF ``BertConfig`` fields, shorter names)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} not a multiple of n_heads={self.n_heads}")

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        """From a Hugging Face config.json dict (model_type bert, absolute positions, gelu)."""
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"unsupported model_type {hf.get('model_type')!r}; expected 'bert'")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"bert hidden_act {hf['hidden_act']!r} unsupported (only gelu)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"bert position_embedding_type {hf['position_embedding_type']!r} unsupported "
                "(only absolute)"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"],
            max_len=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            norm_eps=hf.get("layer_norm_eps", 1e-12),
        )


def _dense(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, kernel_init=_INIT, rngs=rngs)


def _norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, use_fast_variance=False, rngs=rngs)


def _embedding(n: int, cfg: BertConfig, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(n, cfg.d_model, embedding_init=_INIT, rngs=rngs)


class Embeddings(nnx.Module):
    """LN(word + position + token type)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.word = _embedding(cfg.vocab_size, cfg, rngs)
        self.position = _embedding(cfg.max_len, cfg, rngs)
        self.token_type = _embedding(cfg.type_vocab_size, cfg, rngs)
        self.norm = _norm(cfg, rngs)

    def __call__(self, ids_BxL: jax.Array, types_BxL: jax.Array) -> jax.Array:
        pos_LxD = self.position.embedding[: ids_BxL.shape[1]]
        return self.norm(self.word(ids_BxL) + pos_LxD[None] + self.token_type(types_BxL))


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention over the real (unmasked) keys, then the output dense."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.q, self.k, self.v, self.o = (_dense(cfg.d_model, cfg.d_model, rngs) for _ in "qkvo")

    def __call__(self, h_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        B, L, D = h_BxLxD.shape
        H, d = self.n_heads, D // self.n_heads
        q_BxLxHxd, k_BxLxHxd, v_BxLxHxd = (
            p(h_BxLxD).reshape(B, L, H, d) for p in (self.q, self.k, self.v)
        )
        s_BxHxLxL = jnp.einsum("blhd,bmhd->bhlm", q_BxLxHxd, k_BxLxHxd) / np.sqrt(d)
        # A finite fill keeps all-padding rows finite (uniform weights), as HF's additive mask.
        real_Bx1x1xL = (mask_BxL > 0)[:, None, None, :]
        s_BxHxLxL = jnp.where(real_Bx1x1xL, s_BxHxLxL, jnp.finfo(s_BxHxLxL.dtype).min)
        p_BxHxLxL = jax.nn.softmax(s_BxHxLxL, axis=-1)
        out_BxLxHxd = jnp.einsum("bhlm,bmhd->blhd", p_BxHxLxL, v_BxLxHxd)
        return self.o(out_BxLxHxd.reshape(B, L, D))


class Layer(nnx.Module):
    """Post-LN transformer layer: h = LN(h + attn(h)); h = LN(h + proj(gelu(fc(h))))."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.attn_norm = _norm(cfg, rngs)
        self.fc = _dense(cfg.d_model, cfg.d_ff, rngs)
        self.proj = _dense(cfg.d_ff, cfg.d_model, rngs)
        self.mlp_norm = _norm(cfg, rngs)

    def __call__(self, h_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        h_BxLxD = self.attn_norm(h_BxLxD + self.attn(h_BxLxD, mask_BxL))
        mlp_BxLxD = self.proj(jax.nn.gelu(self.fc(h_BxLxD), approximate=False))
        return self.mlp_norm(h_BxLxD + mlp_BxLxD)


class Bert(nnx.Module):
    """Token ids -> last hidden states h_BxLxD (BertModel's ``last_hidden_state``)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])

    def __call__(self, ids_BxL, mask_BxL, types_BxL) -> jax.Array:
        h_BxLxD = self.embeddings(ids_BxL, types_BxL)
        for layer in self.layers:
            h_BxLxD = layer(h_BxLxD, mask_BxL)
        return h_BxLxD


def build(cfg: BertConfig, key: jax.Array):
    """(graphdef, params) of a randomly initialised encoder."""
    return nnx.split(Bert(cfg, rngs=nnx.Rngs(params=key)), nnx.Param)


def abstract(cfg: BertConfig):
    """(graphdef, abstract params) without allocating: for imports."""
    return nnx.split(nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)


def hidden_states(graphdef, params, ids_BxL, mask_BxL, types_BxL=None) -> jax.Array:
    """h_BxLxD (float32): last hidden states; ``types_BxL`` defaults to token type 0."""
    model = nnx.merge(graphdef, params)
    ids_BxL, mask_BxL = jnp.asarray(ids_BxL), jnp.asarray(mask_BxL)
    types_BxL = jnp.zeros_like(ids_BxL) if types_BxL is None else jnp.asarray(types_BxL)
    if ids_BxL.ndim != 2 or mask_BxL.shape != ids_BxL.shape or types_BxL.shape != ids_BxL.shape:
        raise ValueError(
            f"expected ids_BxL, mask_BxL and types_BxL of one 2-D shape, got {ids_BxL.shape}, "
            f"{mask_BxL.shape}, {types_BxL.shape}"
        )
    if ids_BxL.shape[1] > model.cfg.max_len:
        raise ValueError(f"sequence length {ids_BxL.shape[1]} exceeds max_len={model.cfg.max_len}")
    return model(ids_BxL, mask_BxL, types_BxL)


def mean_pool(h_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """E_BxD: mean over real tokens, L2-normalised (sentence-transformers Pooling + Normalize)."""
    w_BxL = jnp.asarray(mask_BxL, h_BxLxD.dtype)
    mean_BxD = (h_BxLxD * w_BxL[..., None]).sum(1) / jnp.maximum(w_BxL.sum(1), 1e-9)[:, None]
    return mean_BxD / jnp.maximum(jnp.linalg.norm(mean_BxD, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=0)
def embed(graphdef, params, ids_BxL, mask_BxL) -> jax.Array:
    """E_BxD (float32, unit rows): sentence embeddings of right-padded token ids."""
    return mean_pool(hidden_states(graphdef, params, ids_BxL, mask_BxL), mask_BxL)


def _layout(cfg: BertConfig) -> list[tuple[str, tuple, bool]]:
    """[(HF tensor name, our param path, transposed)]; nn.Linear weights are out x in."""
    rows = [
        ("embeddings.word_embeddings.weight", ("embeddings", "word", "embedding"), False),
        ("embeddings.position_embeddings.weight", ("embeddings", "position", "embedding"), False),
        (
            "embeddings.token_type_embeddings.weight",
            ("embeddings", "token_type", "embedding"),
            False,
        ),
        ("embeddings.LayerNorm.weight", ("embeddings", "norm", "scale"), False),
        ("embeddings.LayerNorm.bias", ("embeddings", "norm", "bias"), False),
    ]
    modules = [(f"attention.self.{n}", ("attn", n[0])) for n in ("query", "key", "value")]
    modules += [
        ("attention.output.dense", ("attn", "o")),
        ("intermediate.dense", ("fc",)),
        ("output.dense", ("proj",)),
    ]
    norms = [("attention.output.LayerNorm", "attn_norm"), ("output.LayerNorm", "mlp_norm")]
    for i in range(cfg.n_layers):
        hf, us = f"encoder.layer.{i}.", ("layers", i)
        for name, ours in modules:
            rows.append((f"{hf}{name}.weight", (*us, *ours, "kernel"), True))
            rows.append((f"{hf}{name}.bias", (*us, *ours, "bias"), False))
        for name, ours in norms:
            rows.append((f"{hf}{name}.weight", (*us, ours, "scale"), False))
            rows.append((f"{hf}{name}.bias", (*us, ours, "bias"), False))
    return rows


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def from_state_dict(hf_config: dict, tensors: dict[str, np.ndarray]):
    """(cfg, graphdef, params) from a HF config dict and BertModel-named tensors (float32).

    Names may carry a "bert." prefix (BertFor* checkpoints); pooler and task-head tensors are
    ignored. Missing, unexpected or misshapen tensors raise ValueError.
    """
    cfg = BertConfig.from_hf(hf_config)
    graphdef, params = abstract(cfg)
    if any(name.startswith("bert.") for name in tensors):
        tensors = {n.removeprefix("bert."): t for n, t in tensors.items()}
    layout = _layout(cfg)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))
    shapes = {tuple(k.key for k in path): leaf.shape for path, leaf in leaves}
    expected = {n: shapes[p][::-1] if t else shapes[p] for n, p, t in layout}
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {_listing(missing)}")
    extra = sorted(
        n
        for n in tensors
        if n not in expected and not n.startswith(_UNUSED_PREFIXES) and n not in _UNUSED_NAMES
    )
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} unexpected tensor(s): {_listing(extra)}")
    nested: dict = {}
    for name, path, transposed in layout:
        if tuple(tensors[name].shape) != tuple(expected[name]):
            got = tuple(tensors[name].shape)
            raise ValueError(f"tensor {name}: expected shape {tuple(expected[name])}, got {got}")
        value = np.asarray(tensors[name], np.float32)
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value.T if transposed else value)
    nnx.replace_by_pure_dict(params, nested)
    return cfg, graphdef, params


def load_bert(directory) -> tuple[BertConfig, object, nnx.State]:
    """(cfg, graphdef, params) from a HF BERT directory: config.json + model.safetensors."""
    directory = pathlib.Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {path.name} (a HF BERT directory has both)")
    hf_config = json.loads(config_path.read_text())
    BertConfig.from_hf(hf_config)  # an unsupported model fails before reading any weights
    st = require("safetensors.numpy", "loading a BERT checkpoint")
    return from_state_dict(hf_config, st.load_file(weights_path))
