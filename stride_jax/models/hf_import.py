"""Hugging Face checkpoints (config.json + safetensors) <-> ``transformer.Decoder`` params.

Reads and writes with ``safetensors.numpy`` only: no torch at runtime, and pickle checkpoints
(*.bin, *.pt, ...) are refused, never unpickled. Layouts: HF ``nn.Linear`` weights are
out x in (transposed here to NNX's in x out kernels); GPT-2's ``Conv1D`` weights are already
in x out, and its fused ``c_attn`` is split into q, k, v. A tied ``lm_head`` is absent.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from flax import nnx

from stride_jax.models import transformer
from stride_jax.models.transformer import DecoderConfig
from stride_jax.optional import require

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some checkpoints carry that hold no weights: GPT-2's causal masks, rotary tables.
_HARMLESS_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# GPT-2 block modules whose HF weight (LayerNorm or Conv1D, in x out) and bias copy as they are.
_GPT2_SIMPLE = (
    ("ln_1", ("norm1",), "scale"),
    ("ln_2", ("norm2",), "scale"),
    ("attn.c_proj", ("attn", "o"), "kernel"),
    ("mlp.c_fc", ("mlp", "fc"), "kernel"),
    ("mlp.c_proj", ("mlp", "proj"), "kernel"),
)


def _layout(cfg: DecoderConfig) -> list[tuple[str, list[tuple], str]]:
    """[(HF tensor name, our param paths, kind)]; kind is "copy" (same layout), "T" (an
    nn.Linear weight, out x in) or "qkv" (GPT-2's fused c_attn, split on the last axis)."""
    gpt2 = cfg.family == "gpt2"
    base = "transformer." if gpt2 else "model."
    rows = [
        (base + ("wte.weight" if gpt2 else "embed_tokens.weight"), [("wte", "embedding")], "copy")
    ]
    if gpt2:
        rows.append((base + "wpe.weight", [("wpe", "embedding")], "copy"))
    for i in range(cfg.n_layers):
        hf, us = f"{base}h.{i}." if gpt2 else f"{base}layers.{i}.", ("layers", i)
        if gpt2:
            for name, ours, weight in _GPT2_SIMPLE:
                rows.append((f"{hf}{name}.weight", [(*us, *ours, weight)], "copy"))
                rows.append((f"{hf}{name}.bias", [(*us, *ours, "bias")], "copy"))
            for w, ours in (("weight", "kernel"), ("bias", "bias")):
                rows.append(
                    (f"{hf}attn.c_attn.{w}", [(*us, "attn", p, ours) for p in "qkv"], "qkv")
                )
            continue
        rows.append((f"{hf}input_layernorm.weight", [(*us, "norm1", "scale")], "copy"))
        rows.append((f"{hf}post_attention_layernorm.weight", [(*us, "norm2", "scale")], "copy"))
        for p in "qkvo":
            rows.append((f"{hf}self_attn.{p}_proj.weight", [(*us, "attn", p, "kernel")], "T"))
            if cfg.qkv_bias and p != "o":
                rows.append((f"{hf}self_attn.{p}_proj.bias", [(*us, "attn", p, "bias")], "copy"))
        for p in ("gate", "up", "down"):
            rows.append((f"{hf}mlp.{p}_proj.weight", [(*us, "mlp", p, "kernel")], "T"))
    rows.append((base + ("ln_f" if gpt2 else "norm") + ".weight", [("norm", "scale")], "copy"))
    if gpt2:
        rows.append((base + "ln_f.bias", [("norm", "bias")], "copy"))
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", [("lm_head", "kernel")], "T"))
    return rows


def _to_hf(kind: str, ours: list):
    if kind == "T":
        return ours[0].T
    return np.concatenate(ours, axis=-1) if kind == "qkv" else ours[0]


def _to_ours(kind: str, tensor: np.ndarray) -> list[np.ndarray]:
    if kind == "T":
        return [tensor.T]
    return np.split(tensor, 3, axis=-1) if kind == "qkv" else [tensor]


def _hf_shape(kind: str, our_shapes: list[tuple]) -> tuple:
    if kind == "T":
        return our_shapes[0][::-1]
    if kind == "qkv":
        return (*our_shapes[0][:-1], 3 * our_shapes[0][-1])
    return our_shapes[0]


def _flat(params) -> dict[tuple, object]:
    """{param path: leaf} of an ``nnx.State`` (arrays or ShapeDtypeStructs)."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def _harmless(cfg: DecoderConfig, name: str) -> bool:
    return name.endswith(_HARMLESS_SUFFIXES) or (cfg.tie_embeddings and name == "lm_head.weight")


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def from_state_dict(hf_config: dict, tensors: dict[str, np.ndarray]):
    """(cfg, graphdef, params) from a HF config dict and HF-named tensors (float32 params).

    Names may lack the base prefix ("transformer." / "model.") as in GPT2Model/LlamaModel
    files. Missing, unexpected (beyond harmless buffers) or misshapen tensors raise ValueError.
    """
    cfg = DecoderConfig.from_hf(hf_config)
    graphdef, abstract_params = transformer.abstract(cfg)
    base = "transformer." if cfg.family == "gpt2" else "model."
    if not any(name.startswith(base) for name in tensors):
        tensors = {n if n.startswith("lm_head.") else base + n: t for n, t in tensors.items()}
    layout = _layout(cfg)
    ours = _flat(abstract_params)
    expected = {n: _hf_shape(k, [ours[p].shape for p in paths]) for n, paths, k in layout}
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {_listing(missing)}")
    extra = sorted(n for n in tensors if n not in expected and not _harmless(cfg, n))
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} unexpected tensor(s): {_listing(extra)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            got = tuple(tensors[name].shape)
            raise ValueError(f"tensor {name}: expected shape {tuple(shape)}, got {got}")
    values = {}
    for name, paths, kind in layout:
        for path, value in zip(paths, _to_ours(kind, np.asarray(tensors[name])), strict=True):
            values[path] = np.asarray(value, dtype=ours[path].dtype)
    nested: dict = {}
    for path, value in values.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.numpy.asarray(value)
    nnx.replace_by_pure_dict(abstract_params, nested)
    return cfg, graphdef, abstract_params


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [n for n in names if not (directory / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shard(s) not in the directory: {absent}")
        return [directory / n for n in names]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory} holds only pickle checkpoint(s) ({', '.join(pickles)}), which are "
            "never unpickled here (loading pickle can run arbitrary code). Convert them to "
            "safetensors in an environment you trust, e.g. AutoModelForCausalLM.from_pretrained"
            "(dir).save_pretrained(out_dir, safe_serialization=True), and import that."
        )
    raise FileNotFoundError(f"{directory}: no *.safetensors weight files")


def load_hf(directory) -> tuple[DecoderConfig, object, nnx.State]:
    """(cfg, graphdef, params) from a HF checkpoint directory: config.json and
    model.safetensors, or shards listed in model.safetensors.index.json."""
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face checkpoint dir)")
    hf_config = json.loads(config_path.read_text())
    DecoderConfig.from_hf(hf_config)  # an unsupported model fails before reading any weights
    st = require("safetensors.numpy", "loading Hugging Face checkpoints")
    tensors = {}
    for path in _weight_files(directory):
        tensors.update(st.load_file(path))
    return from_state_dict(hf_config, tensors)


def to_state_dict(cfg: DecoderConfig, params) -> dict[str, np.ndarray]:
    """HF-named float32 numpy tensors of ``params`` (as a HF *ForCausalLM model names them)."""
    ours = {path: np.asarray(leaf, np.float32) for path, leaf in _flat(params).items()}
    return {
        name: np.ascontiguousarray(_to_hf(kind, [ours[p] for p in paths]))
        for name, paths, kind in _layout(cfg)
    }


def save_hf(cfg: DecoderConfig, params, directory) -> None:
    """Write config.json and model.safetensors that ``load_hf`` and transformers' PyTorch
    ``AutoModelForCausalLM.from_pretrained`` both load."""
    st = require("safetensors.numpy", "writing Hugging Face checkpoints")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    st.save_file(
        to_state_dict(cfg, params), directory / "model.safetensors", metadata={"format": "pt"}
    )
