"""Decoder-only transformer (Flax NNX): the GPT-2 family and the Llama family in one module.

GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, biases everywhere. Llama (also Qwen2,
SmolLM2, Mistral-like): RoPE, RMSNorm, SwiGLU, grouped-query attention, optional q/k/v bias.
Attention is causal with a key padding mask ``mask_BxL`` (1 = real token, right padding,
positions 0..L-1). The pure functions at the bottom take ``nnx.split`` state, so they jit and
vmap over a stacked params pytree (M models at once); ``hidden_at`` / ``logits_from`` cut the
forward pass at the residual stream after any block, where steering operators hook in.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_INIT = nnx.initializers.normal(0.02)
_LLAMA_TYPES = ("llama", "mistral", "qwen2")


# DecoderConfig fields read straight from a GPT-2 config.json (ours: theirs).
_GPT2_SIZES = dict(vocab_size="vocab_size", d_model="n_embd", n_layers="n_layer", n_heads="n_head")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a ``Decoder``; ``None`` fields resolve to their defaults on creation.

    ``family`` is "gpt2" or "llama" (Llama, Qwen2, SmolLM2, Mistral-like). ``qkv_bias`` only
    matters for "llama" (GPT-2 has biases everywhere).
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    d_ff: int | None = None
    max_len: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tie_embeddings: bool = True
    head_dim: int | None = None

    def __post_init__(self):
        resolved = {
            "n_kv_heads": self.n_kv_heads or self.n_heads,
            "d_ff": self.d_ff or 4 * self.d_model,
            "head_dim": self.head_dim or self.d_model // self.n_heads,
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"family must be 'gpt2' or 'llama', got {self.family!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.family == "gpt2" and (
            self.n_kv_heads != self.n_heads or self.head_dim * self.n_heads != self.d_model
        ):
            raise ValueError("gpt2 needs n_kv_heads == n_heads and head_dim * n_heads == d_model")

    @classmethod
    def from_hf(cls, hf_config: dict) -> DecoderConfig:
        """From a Hugging Face config.json dict (model_type gpt2, llama, qwen2 or mistral)."""
        hf, kind = hf_config, hf_config.get("model_type")
        if kind == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"gpt2 activation_function {act!r} unsupported (only gelu_new)")
            if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
                raise ValueError(
                    "gpt2 attention scaling options other than the default unsupported"
                )
            sizes = {ours: hf[theirs] for ours, theirs in _GPT2_SIZES.items()}
            return cls(
                "gpt2",
                **sizes,
                d_ff=hf.get("n_inner"),
                max_len=hf.get("n_positions", 1024),
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        if kind not in _LLAMA_TYPES:
            raise ValueError(f"unsupported model_type {kind!r}; supported: gpt2, {_LLAMA_TYPES}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{kind} hidden_act {hf['hidden_act']!r} unsupported (only silu)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError(f"{kind} attention_bias/mlp_bias (output/MLP biases) unsupported")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{kind} use_sliding_window=true unsupported")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"rope scaling {rope!r} unsupported (only plain RoPE, rope_type default)"
            )
        max_len = hf.get("max_position_embeddings", 2048)
        if hf.get("sliding_window"):  # Mistral-like: exact for sequences within the window
            max_len = min(max_len, hf["sliding_window"])
        return cls(
            "llama",
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"),
            d_ff=hf["intermediate_size"],
            max_len=max_len,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            qkv_bias=kind == "qwen2",
            tie_embeddings=hf.get("tie_word_embeddings", False),
            head_dim=hf.get("head_dim"),
        )

    def to_hf(self) -> dict:
        """A config.json dict for GPT2Config, LlamaConfig or (with qkv_bias) Qwen2Config."""
        common = {"vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_embeddings}
        common["dtype"] = "float32"
        if self.family == "gpt2":
            return {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                **common,
                "n_embd": self.d_model,
                "n_layer": self.n_layers,
                "n_head": self.n_heads,
                "n_inner": self.d_ff,
                "n_positions": self.max_len,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": "gelu_new",
                **dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), 0.0),
            }
        kind, arch = (
            ("qwen2", "Qwen2ForCausalLM") if self.qkv_bias else ("llama", "LlamaForCausalLM")
        )
        return {
            "model_type": kind,
            "architectures": [arch],
            **common,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "hidden_act": "silu",
        }


def _dense(d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=_INIT, rngs=rngs)


def _norm(cfg: DecoderConfig, rngs: nnx.Rngs) -> nnx.Module:
    kw = dict(epsilon=cfg.norm_eps, use_fast_variance=False, rngs=rngs)
    if cfg.family == "gpt2":
        return nnx.LayerNorm(cfg.d_model, **kw)
    return nnx.RMSNorm(cfg.d_model, **kw)


def _rope(x_BxLxNxd: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding at positions 0..L-1, HF's rotate-half convention."""
    L, d = x_BxLxNxd.shape[1], x_BxLxNxd.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle_Lxd2 = jnp.arange(L, dtype=jnp.float32)[:, None] * inv_freq[None]
    cos, sin = jnp.cos(angle_Lxd2)[:, None], jnp.sin(angle_Lxd2)[:, None]
    x1, x2 = x_BxLxNxd[..., : d // 2], x_BxLxNxd[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    """Causal multi-head attention with K kv heads shared by groups of G = H / K query heads."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        gpt2 = cfg.family == "gpt2"
        hd, bias = cfg.head_dim, gpt2 or cfg.qkv_bias
        self.n_kv_heads, self.head_dim = cfg.n_kv_heads, hd
        self.rope_theta = None if gpt2 else cfg.rope_theta
        self.q = _dense(cfg.d_model, cfg.n_heads * hd, bias, rngs)
        self.k = _dense(cfg.d_model, cfg.n_kv_heads * hd, bias, rngs)
        self.v = _dense(cfg.d_model, cfg.n_kv_heads * hd, bias, rngs)
        self.o = _dense(cfg.n_heads * hd, cfg.d_model, gpt2, rngs)

    def __call__(self, x_BxLxD: jax.Array, allowed_BxLxL: jax.Array) -> jax.Array:
        B, L, _ = x_BxLxD.shape
        K, d = self.n_kv_heads, self.head_dim
        q_BxLxHxd = self.q(x_BxLxD).reshape(B, L, -1, d)
        k_BxLxKxd = self.k(x_BxLxD).reshape(B, L, K, d)
        v_BxLxKxd = self.v(x_BxLxD).reshape(B, L, K, d)
        if self.rope_theta is not None:
            q_BxLxHxd = _rope(q_BxLxHxd, self.rope_theta)
            k_BxLxKxd = _rope(k_BxLxKxd, self.rope_theta)
        q_BxLxKxGxd = q_BxLxHxd.reshape(B, L, K, -1, d)  # query head h uses kv head h // G
        s_BxKxGxLxL = jnp.einsum("blkgd,bmkd->bkglm", q_BxLxKxGxd, k_BxLxKxd) / np.sqrt(d)
        # A finite fill keeps rows with no allowed key (all padding) finite: uniform, not NaN.
        s_BxKxGxLxL = jnp.where(
            allowed_BxLxL[:, None, None], s_BxKxGxLxL, jnp.finfo(s_BxKxGxLxL.dtype).min
        )
        p_BxKxGxLxL = jax.nn.softmax(s_BxKxGxLxL, axis=-1)
        out_BxLxKxGxd = jnp.einsum("bkglm,bmkd->blkgd", p_BxKxGxLxL, v_BxLxKxd)
        return self.o(out_BxLxKxGxd.reshape(B, L, -1))


class GeluMLP(nnx.Module):
    """GPT-2's MLP: proj(gelu_tanh(fc(x)))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.fc = _dense(cfg.d_model, cfg.d_ff, True, rngs)
        self.proj = _dense(cfg.d_ff, cfg.d_model, True, rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.proj(jax.nn.gelu(self.fc(x_BxLxD), approximate=True))


class SwiGLU(nnx.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.gate = _dense(cfg.d_model, cfg.d_ff, False, rngs)
        self.up = _dense(cfg.d_model, cfg.d_ff, False, rngs)
        self.down = _dense(cfg.d_ff, cfg.d_model, False, rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD))


class Block(nnx.Module):
    """Pre-norm residual block: h + attn(norm1(h)), then + mlp(norm2(h))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = _norm(cfg, rngs)
        self.mlp = (GeluMLP if cfg.family == "gpt2" else SwiGLU)(cfg, rngs=rngs)

    def __call__(self, h_BxLxD: jax.Array, allowed_BxLxL: jax.Array) -> jax.Array:
        h_BxLxD = h_BxLxD + self.attn(self.norm1(h_BxLxD), allowed_BxLxL)
        return h_BxLxD + self.mlp(self.norm2(h_BxLxD))


class Decoder(nnx.Module):
    """Token ids -> next-token logits; the residual stream is reachable between any blocks."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_INIT, rngs=rngs)
        gpt2 = cfg.family == "gpt2"
        self.wpe = (
            nnx.Embed(cfg.max_len, cfg.d_model, embedding_init=_INIT, rngs=rngs) if gpt2 else None
        )
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = _norm(cfg, rngs)
        self.lm_head = (
            None if cfg.tie_embeddings else _dense(cfg.d_model, cfg.vocab_size, False, rngs)
        )

    def embed(self, tokens_BxL: jax.Array) -> jax.Array:
        """h_BxLxD: token embeddings (+ learned positions 0..L-1 for gpt2)."""
        h_BxLxD = self.wte(tokens_BxL)
        if self.wpe is not None:
            h_BxLxD = h_BxLxD + self.wpe.embedding[: tokens_BxL.shape[1]][None]
        return h_BxLxD

    def blocks(
        self, h_BxLxD, mask_BxL, start: int = 0, stop: int | None = None, remat: bool = False
    ) -> jax.Array:
        """The residual stream through blocks [start, stop) (static ints). ``remat``: each
        block is a ``jax.checkpoint``, so a backward pass keeps only the residual stream between
        blocks and recomputes each block's activations (see ``normed_from``)."""
        L = h_BxLxD.shape[1]
        causal_LxL = jnp.tril(jnp.ones((L, L), bool))
        allowed_BxLxL = causal_LxL[None] & (jnp.asarray(mask_BxL) > 0)[:, None, :]
        for i in range(start, len(self.layers) if stop is None else stop):
            if remat:
                block_gd, block_state = nnx.split(self.layers[i])
                h_BxLxD = jax.checkpoint(lambda st, h, a, g=block_gd: nnx.merge(g, st)(h, a))(
                    block_state, h_BxLxD, allowed_BxLxL
                )
            else:
                h_BxLxD = self.layers[i](h_BxLxD, allowed_BxLxL)
        return h_BxLxD

    def final_norm(self, h_BxLxD: jax.Array) -> jax.Array:
        return self.norm(h_BxLxD)

    def head_matrix(self) -> jax.Array:
        """W_DxV, the unembedding (the token embedding transposed when tied)."""
        if self.lm_head is None:
            return self.wte.embedding[...].T
        return self.lm_head.kernel[...]

    def __call__(self, tokens_BxL: jax.Array, mask_BxL: jax.Array | None = None) -> jax.Array:
        if mask_BxL is None:
            mask_BxL = jnp.ones(tokens_BxL.shape, jnp.int32)
        h_BxLxD = self.blocks(self.embed(tokens_BxL), mask_BxL)
        return self.final_norm(h_BxLxD) @ self.head_matrix()


def build(cfg: DecoderConfig, key: jax.Array):
    """(graphdef, params) of a randomly initialised decoder."""
    return nnx.split(Decoder(cfg, rngs=nnx.Rngs(params=key)), nnx.Param)


def abstract(cfg: DecoderConfig):
    """(graphdef, abstract params) without allocating: for restores and imports."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)


def _checked(graphdef, params, x, mask_BxL, layer: int | None = None) -> Decoder:
    """The merged model, after checking the batch (tokens_BxL or h_BxLxD) and ``layer``."""
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    if x.ndim not in (2, 3) or (mask_BxL is not None and mask_BxL.shape != x.shape[:2]):
        mask_shape = None if mask_BxL is None else mask_BxL.shape
        raise ValueError(
            f"expected tokens_BxL or h_BxLxD and mask_BxL, got {x.shape}, {mask_shape}"
        )
    if x.shape[1] > cfg.max_len:
        raise ValueError(f"sequence length {x.shape[1]} exceeds max_len={cfg.max_len}")
    if layer is not None and not 0 <= layer <= cfg.n_layers:
        raise ValueError(f"layer must be in 0..{cfg.n_layers}, got {layer}")
    return model


def apply(graphdef, params, tokens_BxL, mask_BxL=None) -> jax.Array:
    """logits_BxLxV (float32) of the model (graphdef, params)."""
    return _checked(graphdef, params, tokens_BxL, mask_BxL)(tokens_BxL, mask_BxL)


def with_compute_dtype(model: Decoder, dtype: str) -> Decoder:
    """``model`` (merged, modified in place) whose linear layers take ``dtype`` operands and
    accumulate and return float32 (``preferred_element_type``); "float32" leaves it as it is.
    The residual stream, norms, attention scores and softmax, embeddings and the head stay
    float32: only the q/k/v/o projections and the MLPs' products run in ``dtype``."""
    if dtype == "float32":
        return model
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear):
            module.dtype = jnp.dtype(dtype)
            module.preferred_element_type = jnp.float32
    return model


def hidden_at(
    graphdef, params, tokens_BxL, mask_BxL, layer: int, compute_dtype: str = "float32"
) -> jax.Array:
    """h_BxLxD: residual stream after ``layer`` blocks (0 = embeddings, n_layers = pre-norm);
    ``compute_dtype``: the linear layers' (``with_compute_dtype``)."""
    model = _checked(graphdef, params, tokens_BxL, mask_BxL, layer)
    model = with_compute_dtype(model, compute_dtype)
    return model.blocks(model.embed(tokens_BxL), mask_BxL, 0, layer)


def normed_from(
    graphdef,
    params,
    h_BxLxD,
    mask_BxL,
    layer: int,
    compute_dtype: str = "float32",
    remat: bool = False,
) -> jax.Array:
    """hn_BxLxD: blocks[layer:] then the final norm (logits = hn @ head_matrix).

    ``compute_dtype``: the linear layers' (``with_compute_dtype``). ``remat``: checkpoint each
    block (``Decoder.blocks``): under a gradient the backward pass then holds the residual
    stream between blocks instead of every block's intermediates (q/k/v, attention weights,
    the MLP's d_ff activations), at the cost of recomputing the blocks' forward once."""
    model = _checked(graphdef, params, h_BxLxD, mask_BxL, layer)
    model = with_compute_dtype(model, compute_dtype)
    return model.final_norm(model.blocks(h_BxLxD, mask_BxL, layer, remat=remat))


def logits_from(graphdef, params, h_BxLxD, mask_BxL, layer: int) -> jax.Array:
    """logits_BxLxV continuing from the residual stream after ``layer`` blocks."""
    return normed_from(graphdef, params, h_BxLxD, mask_BxL, layer) @ head_matrix(graphdef, params)


def head_matrix(graphdef, params) -> jax.Array:
    """W_DxV, the unembedding."""
    return nnx.merge(graphdef, params).head_matrix()


@functools.partial(jax.jit, static_argnums=0)
def _next_token(graphdef, params, tokens_1xT, mask_1xT, pos):
    return jnp.argmax(apply(graphdef, params, tokens_1xT, mask_1xT)[0, pos])


def greedy_generate(graphdef, params, tokens_1xP, steps: int, eos_id: int | None = None):
    """Greedy continuation of one prompt: tokens_1xT, the prompt then up to ``steps`` new
    tokens (stopping after the first ``eos_id``). Every step runs one jitted forward pass over
    a fixed 1 x (P + steps) buffer, the not-yet-generated tail masked out."""
    prompt_1xP = np.asarray(tokens_1xP)
    if prompt_1xP.ndim != 2 or prompt_1xP.shape[0] != 1:
        raise ValueError(f"expected one prompt tokens_1xP, got shape {prompt_1xP.shape}")
    P = prompt_1xP.shape[1]
    buf_1xT = np.zeros((1, P + steps), np.int32)
    buf_1xT[:, :P] = prompt_1xP
    for t in range(P, P + steps):
        mask_1xT = (np.arange(P + steps) < t)[None].astype(np.int32)
        buf_1xT[0, t] = int(_next_token(graphdef, params, buf_1xT, mask_1xT, t - 1))
        if eos_id is not None and buf_1xT[0, t] == eos_id:
            return jnp.asarray(buf_1xT[:, : t + 1])
    return jnp.asarray(buf_1xT)
