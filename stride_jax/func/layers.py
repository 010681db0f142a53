"""Token-level inputs and output gradients of a decoder's dense layers (LoGRA, EK-FAC).

A dense kernel W (in x out) at module path ``p`` (e.g. ``"layers/1/mlp/fc"``) has per-row
gradient G = sum_t x_t g_t^T, with x_t the layer's input at token t and g_t the gradient of
the row's loss w.r.t. the layer's output there. ``layer_io`` returns those x and g for
several layers at once by swapping each layer for a ``Tap`` that records its input and adds a
zero ``eps`` to its output (the gradient w.r.t. eps is g), so G is never formed; ``tap``
(also a classifier's, ``tasks.dense``) does the swapping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stride_jax.errors import ConfigError
from stride_jax.func.grads import partition


def kernel_paths(names) -> tuple[str, ...]:
    """Module paths (``"layers/1/mlp/fc"``) of the dense kernels among parameter ``names``."""
    paths = tuple(n.removesuffix("/kernel") for n in names if n.endswith("/kernel"))
    if not paths:
        raise ConfigError(f"no dense kernel among the chosen parameters {names[:4]}")
    return paths


def kernel_shape(params, path: str) -> tuple[int, int]:
    """(in, out) of the dense kernel at module ``path``."""
    return partition(params, (path + "/kernel",))[0][path + "/kernel"].shape


class Tap(nnx.Module):
    """A dense layer whose input is kept (``x``) and whose output gets ``eps`` added."""

    def __init__(self, linear, eps):
        self.linear, self.eps = linear, nnx.Intermediate(eps)

    def __call__(self, x):
        self.x = nnx.Intermediate(x)
        return self.linear(x) + self.eps[...]


def _owner(model, path: str):
    """(the module holding the submodule at ``path``, its attribute name or list index)."""
    *parents, name = path.split("/")
    owner = model
    for part in parents:
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
    return owner, (int(name) if name.isdigit() else name)


def module_at(model, path: str):
    """The submodule of ``model`` at ``path`` (``"layers/1/mlp/fc"``, ``"head"``)."""
    owner, name = _owner(model, path)
    return owner[name] if isinstance(name, int) else getattr(owner, name)


def replace_at(model, path: str, new) -> None:
    """Put ``new`` in place of ``model``'s submodule at ``path`` (in place)."""
    owner, name = _owner(model, path)
    if isinstance(name, int):
        owner[name] = new
    else:
        setattr(owner, name, new)


def tap(model, paths, eps_layers) -> list[Tap]:
    """Swap the layers at ``paths`` of ``model`` (in place) for taps adding ``eps_layers``."""
    taps = []
    for path, eps in zip(paths, eps_layers, strict=True):
        taps.append(Tap(module_at(model, path), eps))
        replace_at(model, path, taps[-1])
    return taps


def sample_labels(key, logits) -> jax.Array:
    """Labels drawn from ``softmax(logits)`` over the last axis (one per leading position),
    by inverse CDF: one uniform per position, scaled to the running sum's total, against the
    running sum of the probabilities. ``jax.random.categorical`` (Gumbel max) draws one
    uniform per position and class: at SmolLM2's 49,152 classes, 16 rows of 127 tokens took
    1.70 s a call against 0.46 s here, and at lm_shakespeare's 65 it compiled EK-FAC's two
    passes 0.6 s slower (2-core CPU). A class of probability 0 is never drawn."""
    c = jnp.cumsum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    u = jax.random.uniform(key, c.shape[:-1] + (1,)) * c[..., -1:]
    return jnp.minimum((c <= u).sum(-1), c.shape[-1] - 1).astype(jnp.int32)


def layer_io(graphdef, params, paths, rows: dict, key=None, data_too: bool = False):
    """[(x_BxLxI inputs, g_BxLxO output gradients)] of the dense layers at ``paths``.

    g is the gradient of the row's mean target CE (``lm_train.example_losses``) w.r.t. the
    layer output, so the row's kernel gradient is ``x^T g``; with ``key``, the targets are
    sampled from the model's own predictive distribution instead of the data (true Fisher).
    With ``key`` and ``data_too``: ``(pairs, g_data)``, the data targets' output gradients
    too, pulled back from the same forward pass (one forward, two backwards).
    """
    tokens, B, L = rows["tokens"], *rows["tokens"].shape
    eps0 = [jnp.zeros((B, L, kernel_shape(params, p)[1])) for p in paths]
    w = rows["loss_mask"][:, 1:]

    def mean_ce(logits, targets):  # summed over rows
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return ((ce * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)).sum()

    def losses(eps):
        model = nnx.merge(graphdef, params)
        taps = tap(model, paths, eps)
        logits = model(tokens, rows["attn"])[:, :-1]
        targets = [tokens[:, 1:]]
        if key is not None:
            sampled = sample_labels(key, jax.lax.stop_gradient(logits))
            targets = [sampled, *targets] if data_too else [sampled]
        return jnp.stack([mean_ce(logits, t) for t in targets]), [t.x[...] for t in taps]

    vals, pull, xs = jax.vjp(losses, eps0, has_aux=True)
    # Both label sets' backward as one batched pull (two cotangents): on lm_shakespeare the
    # fused stage 1 took 5.6 s against 6.0 s with two pulls in a row (medians of 6
    # interleaved rounds; EK-FAC's own fit 5.1 s).
    stacked = jax.vmap(lambda c: pull(c)[0])(jnp.eye(len(vals)))
    g_K = [[g[k] for g in stacked] for k in range(len(vals))]
    pairs = list(zip(xs, g_K[0], strict=True))
    return (pairs, g_K[1]) if len(g_K) > 1 else pairs
