"""The one training recipe for decoders: pre-training from scratch and fine-tuning (SFT).

A run is a pure function of (start params, key, example weights): AdamW with linear warmup
and cosine decay, ``steps`` updates, each on ``batch`` rows drawn with replacement from the
rows whose weight is positive (probability proportional to the weight). Step s draws with
``fold_in(key, s)``, so a run resumed from a checkpoint takes exactly the steps an
uninterrupted run would, and ``jax.vmap`` over (key, weights) trains M models at once (the
ground-truth retrains) with the recipe that made the base model.

The loss of one row is the mean cross-entropy over its target tokens (``loss_mask``: for SFT
only response tokens count), matching how queries are scored.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import optax

from stride_jax.models import transformer


def example_losses(graphdef, params, tokens_BxL, attn_BxL, loss_mask_BxL) -> jax.Array:
    """Per-row mean next-token cross-entropy over the row's target tokens: (B,)."""
    logits = transformer.apply(graphdef, params, tokens_BxL, attn_BxL)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens_BxL[:, 1:])
    w = loss_mask_BxL[:, 1:].astype(ce.dtype)
    return (ce * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)


def schedule(config) -> optax.Schedule:
    """The recipe's learning rate: linear warmup then cosine decay to ``lr_end_frac`` of it."""
    return optax.warmup_cosine_decay_schedule(
        0.0,
        config.lr,
        max(config.warmup_steps, 1),
        max(config.steps, config.warmup_steps + 1),
        config.lr * config.lr_end_frac,
    )


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW on ``schedule(config)``, with grad clipping."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip),
        optax.adamw(schedule(config), b2=0.99, weight_decay=config.weight_decay),
    )


def init_state(config, params) -> dict:
    return {"params": params, "opt_state": make_optimizer(config).init(params), "step": 0}


def run_steps(config, graphdef, state, key, data: dict, weight_N, num_steps: int) -> dict:
    """``num_steps`` updates from ``state`` (pure; ``lax.scan``). ``data``: tokens/attn/loss_mask
    arrays N x L. Rows are drawn with probability proportional to ``weight_N``."""
    tx = make_optimizer(config)
    n = data["tokens"].shape[0]
    p_N = weight_N / jnp.maximum(weight_N.sum(), 1e-9)

    def step(state, _):
        rows = jax.random.choice(jax.random.fold_in(key, state["step"]), n, (config.batch,), p=p_N)

        def loss_fn(params):
            return example_losses(
                graphdef,
                params,
                data["tokens"][rows],
                data["attn"][rows],
                data["loss_mask"][rows],
            ).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    return jax.lax.scan(step, state, None, length=num_steps)


def fit(config, graphdef, params0, key, data: dict, weight_N) -> object:
    """Params after the full recipe from ``params0`` (pure, jittable, vmappable)."""
    state = init_state(config, params0)
    state = {**state, "step": jnp.int32(0)}
    state, _ = run_steps(config, graphdef, state, key, data, weight_N, config.steps)
    return state["params"]


def data_arrays(blocks) -> dict:
    """Device arrays of a ``TokenBlocks``: tokens (int32), attn (int32), loss_mask (float32)."""
    return {
        "tokens": jnp.asarray(blocks.tokens_NxL, jnp.int32),
        "attn": jnp.asarray(blocks.attn_mask_NxL, jnp.int32),
        "loss_mask": jnp.asarray(blocks.loss_mask_NxL, jnp.float32),
    }


def jitted_fit(config, graphdef):
    """``fit`` jitted once per (recipe, model): ``(params0, key, data, weight_N) -> params``."""
    return _jitted_fit(config.to_json(), graphdef)


@functools.lru_cache(maxsize=8)
def _jitted_fit(config_json: str, graphdef):
    config = ml_collections.ConfigDict(json.loads(config_json))
    return jax.jit(lambda p, k, d, w: fit(config, graphdef, p, k, d, w))
