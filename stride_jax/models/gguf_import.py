"""Llama-architecture GGUF checkpoints (llama.cpp's format) -> Hugging Face tensors -> NNX model.

`read_gguf` dequantises every tensor with the `gguf` package and renames it to Hugging Face
LlamaForCausalLM names in HF layout (nn.Linear: out x in), undoing the row permutation that
llama.cpp's converter applies to q/k projections; `load_gguf` hands the result to
`hf_import.from_state_dict`. Everything is float32 numpy; quantised weights are expanded.
"""

import os
import re

import numpy as np

from stride_jax.models import hf_import
from stride_jax.optional import require

_MAGIC = b"GGUF"
_REQUIRED = object()

# GGUF tensor names (llama.cpp's "Standardized tensor names") -> HF LlamaForCausalLM names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _gguf():
    """The `gguf` package (the `lm` extra), imported when a GGUF file is read."""
    return require("gguf", "reading GGUF checkpoints")


def _open(path):
    """A `GGUFReader` over `path`, after checking the file exists and starts with GGUF's magic."""
    path = os.fspath(path)
    gguf = _gguf()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected {_MAGIC!r})")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:
        raise ValueError(f"{path} could not be parsed as GGUF: {e}") from e


def _field(reader, key, default=_REQUIRED):
    """Metadata value for `key`, else `default`; a clear error when a required key is absent."""
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is _REQUIRED:
        raise ValueError(f"GGUF metadata has no {key!r}, which a llama checkpoint needs")
    return default


def _hf_config(reader, tensor_shapes):
    """HF llama config.json dict from GGUF metadata and tensor shapes."""
    arch = "llama"
    d_model = int(_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", default=n_heads))
    head_dim = int(_field(reader, f"{arch}.rope.dimension_count", default=d_model // n_heads))
    scaling = _field(reader, f"{arch}.rope.scaling.type", None)
    if "rope_freqs.weight" in tensor_shapes or scaling not in (None, "none"):
        raise ValueError(
            "GGUF checkpoint uses RoPE scaling (rope_freqs.weight or llama.rope.scaling.type="
            f"{scaling!r}); only plain RoPE is supported"
        )
    vocab_size = tensor_shapes["token_embd.weight"][0]
    listed = _field(reader, f"{arch}.vocab_size", None)
    if listed is not None and int(listed) != vocab_size:
        raise ValueError(f"llama.vocab_size={listed} but token_embd.weight has {vocab_size} rows")
    theta = float(_field(reader, f"{arch}.rope.freq_base", default=10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": d_model,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length")),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_shapes,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "torch_dtype": "float32",
    }
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            config[name] = int(token_id)
    return config


def _hf_name(gguf_name):
    """HF name of a GGUF tensor; a clear error for tensors a plain llama model does not have."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF checkpoint")
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def _dequantize(tensor):
    """float32 numpy array of a GGUF tensor in numpy (row-major, HF) shape."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise ValueError(
            f"tensor {tensor.name!r} has quantisation type {qtype.name}, which the gguf package "
            f"cannot dequantise ({e})"
        ) from e
    # GGUF lists dims fastest-first (ggml's ne), the reverse of numpy's order.
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.array(values, dtype=np.float32).reshape(shape)


def unpermute_rotary_rows(w, n_heads):
    """Undo llama.cpp's q/k row permutation (per head, interleaved pairs -> rotate-half halves).

    llama.cpp's converter views each head's rows as (2, head_dim/2) and transposes them to
    (head_dim/2, 2) for its interleaved RoPE; this is the inverse. Works on weights (rows x in)
    and biases (rows,).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path):
    """Read a llama GGUF file as (hf_config dict, {HF LlamaForCausalLM name: float32 array}).

    Arrays are in HF layout (nn.Linear weights out x in); `lm_head.weight` is absent when the
    embeddings are tied (no output.weight in the file), as in HF checkpoints.
    """
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; only 'llama' checkpoints can be imported"
        )
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{path} has no token_embd.weight tensor")
    config = _hf_config(reader, shapes)
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        values = _dequantize(tensor)
        if ".self_attn.q_proj." in name:
            values = unpermute_rotary_rows(values, n_heads)
        elif ".self_attn.k_proj." in name:
            values = unpermute_rotary_rows(values, n_kv)
        tensors[name] = values
    return config, tensors


def context_length(path) -> int:
    """The model's context length from a GGUF file's metadata (no tensors are read)."""
    return int(_field(_open(path), "llama.context_length"))


def load_gguf(path):
    """Llama GGUF file -> (DecoderConfig, graphdef, params) of the NNX decoder."""
    config, tensors = read_gguf(path)
    return hf_import.from_state_dict(config, tensors)


def gguf_tokenizer(path):
    """The tokenizer stored in a GGUF file's metadata, built offline by transformers."""
    transformers = require("transformers", "a GGUF file's tokenizer")

    path = os.path.abspath(os.fspath(path))
    _open(path)
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path)
    )
