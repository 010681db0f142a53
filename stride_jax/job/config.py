"""Run-config defaults and validation (configs themselves live in experiments/configs).

``base_config(kind)`` is the full set of keys every run config of a task kind has; config
files override values, never add keys (ml_collections rejects unknown keys on the command
line). The top-level ``task`` key ("classifier" | "decoder") says which kind the job builds.
A classifier run trains the library MLP on features; a decoder run trains a small decoder
from scratch (``model.source='scratch'``) or fine-tunes a pre-trained one (``'pretrain'``,
``'hf'``, ``'gguf'``) on prompt/response examples; ``train`` is then the one recipe of the
base decoder and of every ground-truth retrain. ``validate`` refuses unknown methods (and
methods that do not support the kind), ablations and out-of-range values before any work.
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections.config_dict import placeholder

from stride_jax import methods
from stride_jax.apps import config as apps_config
from stride_jax.errors import ConfigError
from stride_jax.stride import defaults as stride_defaults
from stride_jax.stride import newton
from stride_jax.task import KINDS

__all__ = ["ConfigError", "base_config", "method_block", "pretrain_config", "validate"]

DEFAULT_METHODS = ("stride", "graddot")
AUTO_BLOCK_LEN = 128  # data.block_len unset: the model's max_len, at most this
ABLATION_NAMES = ("no_fidelity", "no_stability", "no_linearity", "bernoulli_design")
LM_METHODS = (
    "stride",
    "opspace",
    "graddot",
    "tracin",
    "trak1",
    "trak",
    "logra",
    "kfac",
    "ekfac",
    "repsim",
    "minilm",
    "tfidf",
    "bm25",
    "random",
)


def recipe(**overrides) -> dict:
    """The decoder training recipe (``models.lm_train``), with ``overrides``."""
    r = dict(steps=400, batch=16, lr=3e-3, warmup_steps=40, lr_end_frac=0.1, clip=1.0)
    r.update(weight_decay=0.01, seed=0)
    r.update(overrides)
    return r


def arch(**overrides) -> dict:
    """A small decoder architecture (``models.transformer.DecoderConfig`` fields), with
    ``overrides``."""
    a = dict(family="gpt2", d_model=64, n_layers=2, n_heads=4, max_len=64, seed=0)
    a.update(overrides)
    return a


def pretrain_config() -> ml_collections.ConfigDict:
    """experiments/pretrain_lm.py's config: a character GPT on all of Shakespeare but 200
    held-out blocks (``data.name='textfile'`` with ``data.path`` takes any UTF-8 text file;
    'jsonl' a JSONL corpus; ``data.tokenizer`` 'char' or a tokenizer path for BPE)."""
    return ml_collections.ConfigDict(
        dict(
            data=dict(
                name="shakespeare",
                path="",
                tokenizer="char",
                block_len=64,
                n_train=None,
                n_val=0,
                n_query=200,
                seed=0,
            ),
            model=arch(),
            train=recipe(steps=1000),
            ckpt_every=250,
        )
    )


def _classifier_blocks(c: ml_collections.ConfigDict) -> None:
    c.data = dict(name="digits", path="", seed=0, n_train=1400, n_query=200, query_split="query")
    # Base-model recipe, shared by every ground-truth retrain: full-batch AdamW, 150 steps,
    # weight decay; stops at train CE ~0.11 (query CE ~0.10), so it does not memorise.
    c.model = dict(hidden=(128,), steps=150, lr=3e-3, weight_decay=1e-2, seed=0)
    # The noise ceiling retrains the same subsets with seeds from ``ceiling_seed``.
    c.groundtruth = dict(
        num_models=100, alpha=0.5, seed=1, models_per_batch=0, noise_ceiling=True, ceiling_seed=7
    )


def _decoder_blocks(c: ml_collections.ConfigDict) -> None:
    # Unset sizes are automatic (``job.models.resolve``, printed at the start of a run):
    # tokenizer 'auto' is the model's own ('char' for a model built here); block_len the
    # model's max_len, at most AUTO_BLOCK_LEN; n_query / n_val a tenth of the examples each,
    # at most 100 (``data.corpora.auto_held_out``); n_train all the rest.
    c.data = dict(
        name="shakespeare",
        path="",
        tokenizer="auto",
        block_len=placeholder(int),
        n_train=placeholder(int),
        n_val=placeholder(int),
        n_query=placeholder(int),
        seed=0,
    )
    c.model = dict(source="scratch", path="", **arch())
    # Used only by model.source='pretrain': pre-train a decoder here, then fine-tune it.
    c.pretrain = pretrain_config()
    c.train = recipe()
    # ``seeds``: training seeds per subset, their query losses averaged (minibatch order and
    # init are the decoder ground truth's noise); the noise ceiling then averages as many.
    c.groundtruth = dict(
        num_models=64, alpha=0.5, seed=1, models_per_batch=0, noise_ceiling=True, ceiling_seed=7
    ) | dict(seeds=1)


def base_config(kind: str = "classifier") -> ml_collections.ConfigDict:
    """Every key of a run config of task kind ``kind`` ("classifier" | "decoder"), with its
    default. Config files and ``--config.a.b=v`` override values; they never add keys.

    - ``task``: "classifier" (features -> class logits) or "decoder" (a causal LM on text).
    - ``data``: what is attributed.
      Classifier: ``name`` ("digits" | "mnist5k", embedded) or ``path`` (a user .npz with
      x_train, y_train, x_query, y_query and optional ids_train; wins over ``name``),
      ``n_train`` / ``n_query`` (sizes for embedded sets), ``seed`` (the split),
      ``query_split`` ("query", or "val" to tune on the validation rows).
      Decoder: ``name`` ("shakespeare" | "chitchat" | "jsonl") and ``path`` (the JSONL file),
      ``tokenizer`` ("auto": the model's own, "char" for a model built here; "char",
      "pretrained", or a tokenizer path), ``block_len`` (tokens per row; unset: the model's
      max_len, at most 128), ``n_train`` / ``n_val`` / ``n_query`` in examples (unset: a tenth
      each for val and query, at most 100, n_train the rest), ``seed``.
    - ``model``: the base model.
      Classifier: the library MLP (``hidden`` widths, ``steps``, ``lr``, ``weight_decay``,
      ``seed``), full-batch AdamW; the same recipe retrains every ground-truth model.
      Decoder: ``source`` ("scratch" | "pretrain" | "hf" | "gguf"), ``path`` (the HF
      directory or GGUF file), and for a model built here ``family``, ``d_model``,
      ``n_layers``, ``n_heads``, ``max_len``, ``seed``.
    - ``pretrain`` (decoder, used only by ``model.source="pretrain"``): a run of
      experiments/pretrain_lm.py (its own ``data``, ``model``, ``train``, ``ckpt_every``).
    - ``train`` (decoder): the one fine-tuning recipe of the base model and of every retrain
      (``steps``, ``batch``, ``lr``, ``warmup_steps``, ``lr_end_frac``, ``clip``,
      ``weight_decay``, ``seed``).
    - ``groundtruth``: the retrains the LDS is measured against: ``num_models`` models on
      random ``alpha``-fractions of the training examples (``seed``), ``models_per_batch``
      trained per vmapped call (memory and speed only, not results; 0: as many as fit in
      half the free memory), ``noise_ceiling`` (also
      retrain the same subsets with seeds from ``ceiling_seed``: the LDS the retrains reach
      against each other); decoders also ``seeds`` (each subset retrained with that many
      training seeds and its query losses averaged; the noise ceiling then reports the
      ``seeds``-seed agreement and, with ``seeds > 1``, the single-seed one).
    - ``stride``: STRIDE's config (``stride_jax.stride.defaults``; every block is described in
      ``help(stride_jax.attribute)``): seed, design (``num_subsets=0``: automatic T), hook /
      layer, stage1, lasso, size_weighted and batch sizes.
    - ``baselines``: one block per other method, its defaults for this kind
      (``stride_jax.methods.default_configs(kind)``); only the methods in ``methods`` run.
    - ``methods``: names of the methods to score and compare (``stride_jax.methods.names(kind)``).
    - ``variants``: named variants of methods, listed in ``methods`` like methods:
      ``label -> dict(method=name, preset=..., <overrides of the method's block>)``; ``preset``
      (STRIDE only) starts from a named STRIDE recipe (``stride_jax.stride.defaults.PRESETS``:
      "default", "adam", "paper") instead of ``config.stride``. See ``method_block``.
    - ``ablations``: STRIDE variants to run as well: "no_fidelity", "no_stability",
      "no_linearity" (that loss weight set to 0) and "bernoulli_design"; ``ablation_base``
      names the STRIDE config they change ("stride" or a STRIDE variant's label).
    - ``mesh``: the device mesh: ``data`` (rows) x ``ops`` (STRIDE's operators).
    - ``lds``: ``n_boot``, the bootstrap resamples behind every 95% CI.
    - ``apps``: the applications (data selection, contamination audit, tail-patch, top-k
      removal, query reports); see ``stride_jax.apps.config``.
    """
    if kind not in KINDS:
        raise ConfigError(f"task must be one of {KINDS}, got {kind!r}")
    c = ml_collections.ConfigDict()
    c.task = kind
    (_classifier_blocks if kind == "classifier" else _decoder_blocks)(c)
    c.stride = stride_defaults.default(kind)
    c.baselines = methods.default_configs(kind)
    c.methods = DEFAULT_METHODS if kind == "classifier" else ("stride",)
    # Named variants of methods, usable in ``methods`` like a method: label -> dict(method=...,
    # preset=... (STRIDE only: a ``stride.defaults.PRESETS`` name), then overrides of that
    # method's block as nested dicts), e.g. dict(method="ekfac", fisher="empirical").
    c.variants = ml_collections.ConfigDict()
    c.ablations = ()
    c.ablation_base = "stride"  # the STRIDE config the ablations change: stride or a variant
    c.mesh = dict(data=1, ops=1)
    c.lds = dict(n_boot=1000)
    c.apps = apps_config.defaults()
    return c


def method_block(config, label: str) -> tuple[str, ml_collections.ConfigDict]:
    """``(method name, its config block)`` for a label of ``config.methods``: a registered
    method (``config.stride`` or ``config.baselines.<name>``), or a ``config.variants`` entry
    (its method's block, or a STRIDE ``preset``, with the variant's overrides applied to a
    copy). Unknown labels, methods, presets and override keys raise ``ConfigError``."""
    kind = config.task
    if label in config.variants:
        spec = dict(config.variants[label])
        if label in methods.names(kind):
            raise ConfigError(f"config.variants.{label}: the label is a method's name; rename it")
        if "method" not in spec:
            raise ConfigError(f"config.variants.{label} needs method=<name>")
        name, preset = spec.pop("method"), spec.pop("preset", None)
        if name == label:
            raise ConfigError(f"config.variants.{label} cannot be a variant of itself")
        _, block = method_block(config, name)
        if preset is not None:
            if name not in ("stride", "opspace"):  # opspace reads STRIDE's block
                raise ConfigError(
                    f"config.variants.{label}: preset is for method='stride' or 'opspace' only"
                )
            block = stride_defaults.preset(preset, kind)
        block = block.copy_and_resolve_references()
        from stride_jax.job import cli  # set_path: the same key checks as --sweep

        for key, value in _flatten(spec):
            try:
                cli.set_path(block, key, value)
            except ConfigError as err:
                raise ConfigError(f"config.variants.{label}: {err}") from None
        return name, block
    methods.get(label, kind)  # unknown, or not for this kind: a ConfigError naming both
    if label == "stride":
        return label, config.stride
    if label not in config.baselines:
        raise ConfigError(f"config.baselines has no block for method {label!r}")
    return label, config.baselines[label]


def _flatten(spec, prefix: str = ""):
    """``[("a.b", value), ...]`` of a nested dict of overrides."""
    out = []
    for key, value in spec.items():
        if isinstance(value, dict | ml_collections.ConfigDict):
            out += _flatten(dict(value), f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _positive(config, *paths):
    for path in paths:
        value = config
        for part in path.split("."):
            value = value[part]
        if not value > 0:
            raise ConfigError(f"config.{path} must be > 0, got {value}")


def validate(config) -> None:
    """Raise ``ConfigError`` naming the first bad key (before any work is done)."""
    kind = config.get("task")
    if kind not in KINDS:
        raise ConfigError(f"config.task must be one of {KINDS}, got {kind!r}")
    for label in config.variants:
        method_block(config, label)  # a bad variant fails even when not listed in methods
    for name in config.methods:
        method_block(config, name)
    for name in config.ablations:
        if name not in ABLATION_NAMES:
            raise ConfigError(
                f"config.ablations has unknown ablation {name!r}; known: {ABLATION_NAMES}"
            )
    if config.ablations and method_block(config, config.ablation_base)[0] != "stride":
        raise ConfigError(
            f"config.ablation_base must be 'stride' or a STRIDE variant, got "
            f"{config.ablation_base!r}"
        )
    if not 0.0 < config.groundtruth.alpha <= 1.0:
        raise ConfigError(
            f"config.groundtruth.alpha must be in (0, 1], got {config.groundtruth.alpha}"
        )
    _positive(config, "groundtruth.num_models", "lds.n_boot")
    from stride_jax.stride import method as stride_method
    from stride_jax.stride import posterior

    stride_method.lasso_config(config.stride, compressed=True)  # unknown Lasso keys
    for label in dict.fromkeys(("stride", *config.variants, *config.methods)):
        name, block = method_block(config, label)
        if name == "stride":  # a bad recovery fails here, not after the retrains
            posterior.check_config(block)
    if kind == "decoder":
        _positive(config, "groundtruth.seeds")
    if not config.groundtruth.models_per_batch >= 0:
        raise ConfigError(
            "config.groundtruth.models_per_batch must be >= 0 (0: as many as fit in memory), "
            f"got {config.groundtruth.models_per_batch}"
        )
    _validate_design(config)
    (_validate_classifier if kind == "classifier" else _validate_decoder)(config)


def _validate_design(config) -> None:
    from stride_jax.stride import subsets

    dc = config.stride.design
    kinds = (*subsets.KINDS, "auto")
    if dc.kind not in kinds:
        raise ConfigError(f"config.stride.design.kind must be one of {kinds}, got {dc.kind!r}")
    if not (isinstance(dc.num_subsets, int) and dc.num_subsets >= 0):
        raise ConfigError(
            f"config.stride.design.num_subsets must be an integer >= 0 (0: automatic), got "
            f"{dc.num_subsets!r}"
        )


def _validate_classifier(config) -> None:
    _positive(
        config,
        "model.steps",
        "model.lr",
        "stride.design.degree",
        "stride.stage1.rank",
        "stride.stage1.log_every",
        "stride.stage1.ckpt_every",
        "stride.lasso.lam_frac",
        "stride.lasso.maxiter",
        "stride.response_batch",
    )
    st = config.stride.stage1
    if st.steps < 0 or (st.steps == 0 and newton.check_init(st) != "newton"):
        raise ConfigError(
            f"config.stride.stage1.steps must be > 0 (or 0 with stage1.init='newton'), "
            f"got {st.steps}"
        )


def _require_lm_packages(config) -> None:
    """The `lm` extra's packages this decoder run will import, checked before any work (a
    ``MissingExtraError`` naming ``pip install -e ".[lm]"``)."""
    from stride_jax.optional import require

    source, tok = config.model.source, config.data.tokenizer
    if source in ("hf", "pretrain"):
        require("safetensors.numpy", f"model.source={source!r}")
    if source == "gguf":
        require("gguf", "model.source='gguf'")
    if config.data.name == "chitchat":
        require("chitchat_dataset", "data.name='chitchat'")
    if tok not in ("char", "pretrained") and not (tok == "auto" and source == "scratch"):
        require("tokenizers", f"data.tokenizer={tok!r}")
        if source in ("hf", "gguf"):
            require("transformers", f"the tokenizer of model.source={source!r}")


def _validate_decoder(config) -> None:
    if "minilm" in config.methods:  # fail now, not after the retrains
        path = config.baselines.minilm.path
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ConfigError(
                f"method 'minilm' needs the MiniLM encoder in {path!r}: run "
                "`python -m experiments.fetch_minilm` (or set baselines.minilm.path)"
            )
    if config.model.source not in ("scratch", "pretrain", "hf", "gguf"):
        raise ConfigError(
            f"model.source must be scratch, pretrain, hf or gguf, got {config.model.source!r}"
        )
    if config.model.source in ("hf", "gguf") and not config.model.path:
        what = "a Hugging Face directory" if config.model.source == "hf" else "a .gguf file"
        raise ConfigError(f"model.source={config.model.source!r} needs model.path ({what})")
    if config.data.tokenizer == "char" and config.model.source != "scratch":
        raise ConfigError(
            "data.tokenizer='char' builds a new character vocabulary, which cannot match a "
            f"model from model.source={config.model.source!r}: use 'pretrained' or the "
            "model's tokenizer path"
        )
    _require_lm_packages(config)
    if config.data.tokenizer == "pretrained" and config.model.source != "pretrain":
        raise ConfigError("data.tokenizer='pretrained' needs model.source='pretrain'")
    s = config.stride
    for key in ("op_chunk", "vocab_chunk", "query_batch", "encode_batch"):
        if not s[key] > 0:
            raise ConfigError(f"config.stride.{key} must be > 0, got {s[key]}")
    if s.stage1.steps % s.stage1.log_every:
        raise ConfigError("config.stride.stage1.steps must be a multiple of stage1.log_every")
    _positive(config, "train.steps", "train.batch")
