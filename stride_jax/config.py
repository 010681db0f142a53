"""Run-config defaults and validation (configs themselves live in experiments/configs).

``base_config()`` is the full set of keys every run config has; config files override
values, never add keys (ml_collections rejects unknown keys on the command line, and
``validate`` rejects unknown method / ablation names and out-of-range values).
"""

from __future__ import annotations

import ml_collections

from stride_jax import baselines, newton, pipeline
from stride_jax.errors import ConfigError

__all__ = ["ConfigError", "base_config", "validate"]


DEFAULT_METHODS = ("stride", "graddot")
ABLATION_NAMES = ("no_fidelity", "no_stability", "no_linearity", "bernoulli_design")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = dict(name="digits", path="", seed=0, n_train=1400, n_query=200, query_split="query")
    # Base-model recipe, shared by every ground-truth retrain: full-batch AdamW, 150 steps,
    # weight decay; stops at train CE ~0.11 (query CE ~0.10), so it does not memorise.
    c.model = dict(hidden=(128,), steps=150, lr=3e-3, weight_decay=1e-2, seed=0)
    # The noise ceiling retrains the same subsets with seeds from ``ceiling_seed``.
    c.groundtruth = dict(
        num_models=100, alpha=0.5, seed=1, models_per_batch=50, noise_ceiling=True, ceiling_seed=7
    )
    c.stride = dict(
        seed=3,
        response_batch=64,
        # Multiply each subset's responses by its size before the Lasso: the fidelity loss is
        # a mean over members, so an operator answers to the average of its members' effects.
        size_weighted=True,
        hook="logits",
        hidden_rank=64,
        hidden_basis="whitened",  # hook="hidden": "whitened" or "pca" directions of its input
        design=dict(kind="expander", num_subsets=3000, degree=5, seed=2),
        stage1=pipeline.stage1_defaults(**pipeline.NEWTON_RECIPE),
        lasso=pipeline.lasso_defaults(lam_frac=0.003),
    )
    c.baselines = baselines.default_configs()
    c.methods = DEFAULT_METHODS
    c.ablations = ()
    c.mesh = dict(data=1, ops=1)
    c.lds = dict(n_boot=1000)
    return c


def _positive(config, *paths):
    for path in paths:
        value = config
        for part in path.split("."):
            value = value[part]
        if not value > 0:
            raise ConfigError(f"config.{path} must be > 0, got {value}")


def validate(config) -> None:
    """Raise ``ConfigError`` naming the first bad key."""
    for name in config.methods:
        if name not in baselines.REGISTRY:
            raise ConfigError(
                f"config.methods has unknown method {name!r}; known: {sorted(baselines.REGISTRY)}"
            )
    for name in config.ablations:
        if name not in ABLATION_NAMES:
            raise ConfigError(
                f"config.ablations has unknown ablation {name!r}; known: {ABLATION_NAMES}"
            )
    _positive(
        config,
        "model.steps",
        "model.lr",
        "groundtruth.num_models",
        "groundtruth.models_per_batch",
        "stride.design.num_subsets",
        "stride.design.degree",
        "stride.stage1.rank",
        "stride.stage1.log_every",
        "stride.stage1.ckpt_every",
        "stride.lasso.lam_frac",
        "stride.lasso.maxiter",
        "stride.response_batch",
        "lds.n_boot",
    )
    st = config.stride.stage1
    if st.steps < 0 or (st.steps == 0 and newton.check_init(st) != "newton"):
        raise ConfigError(
            f"config.stride.stage1.steps must be > 0 (or 0 with stage1.init='newton'), "
            f"got {st.steps}"
        )
    if not 0.0 < config.groundtruth.alpha <= 1.0:
        raise ConfigError(
            f"config.groundtruth.alpha must be in (0, 1], got {config.groundtruth.alpha}"
        )
    if config.stride.design.kind not in ("expander", "bernoulli"):
        raise ConfigError(
            f"config.stride.design.kind must be 'expander' or 'bernoulli', got "
            f"{config.stride.design.kind!r}"
        )
