"""A classifier's dense layers as K-FAC sees them: inputs and output gradients, per row.

K-FAC and EK-FAC (``stride_jax.methods.influence``) approximate the curvature of a dense
layer's parameters from two per-row quantities: the layer's input ``a`` and the gradient
``g`` of the row's loss w.r.t. the layer's output (the row's kernel gradient is ``a g^T``).
This module gets both for the ``nnx.Linear`` layers of any classifier module by swapping
each chosen layer for a ``func.layers.Tap`` that records its input and adds a zero ``eps`` to
its output (the gradient w.r.t. eps is g), so no per-row gradient is ever formed. The bias
is folded in as an input column of ones. ``ClassifierTask.dense_layers`` / ``dense_io`` call
these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stride_jax.func.layers import module_at, replace_at, tap
from stride_jax.models.mlp import cross_entropy
from stride_jax.task import TaskError, all_param_names


def _has_bias(layer) -> bool:
    return getattr(layer, "bias", None) is not None


def linear_layers(graphdef, params, names, num_features: int) -> tuple[str, ...]:
    """Paths (``"layers/0"``, ``"head"``) of the ``nnx.Linear`` layers whose parameters are
    ``names`` (None: all), in the order the forward pass calls them (input to output).
    Refuses a choice that includes parameters outside those layers or half a layer."""
    model = nnx.merge(graphdef, params)
    linears = {
        "/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)
    }
    chosen = set(all_param_names(params) if names is None else names)
    layers = [p for p in linears if f"{p}/kernel" in chosen]
    covered = {f"{p}/{k}" for p in layers for k in ("kernel", "bias") if _has_bias(linears[p])}
    covered |= {f"{p}/kernel" for p in layers}
    if covered != chosen:
        raise TaskError(
            "kfac/ekfac cover whole nnx.Linear layers (kernel and bias) only; the chosen "
            f"parameters do not: {sorted(chosen ^ covered)[:4]} (restrict params_filter to "
            "the dense layers)"
        )
    order = []

    class Probe(nnx.Module):  # a layer that logs its path when called
        def __init__(self, layer, path):
            self.layer, self.path = layer, path

        def __call__(self, x):
            order.append(self.path)
            return self.layer(x)

    def forward(p, x):
        model = nnx.merge(graphdef, p)
        for path in layers:
            replace_at(model, path, Probe(module_at(model, path), path))
        return model(x)

    jax.eval_shape(forward, params, jax.ShapeDtypeStruct((1, num_features), jnp.float32))
    if sorted(order) != sorted(layers):
        raise TaskError(
            "kfac/ekfac need each chosen nnx.Linear called exactly once per forward pass; "
            f"chosen {sorted(layers)}, called {order}"
        )
    return tuple(order)


def dense_io(graphdef, params, batch: dict, layers, fisher: str, key=None, with_data=False):
    """``Task.dense_io`` of a classifier (one token per row, T = 1); see ``task.Task``.

    ``fisher``: "empirical" (one term: the data labels, weight 1), "true" (one term per class
    c: labels c, weight p_c(x), so the terms sum to the expectation over the model's
    predictive distribution exactly) or "sampled" (one term: labels drawn from it with key).
    """
    x, n = batch["x"], batch["x"].shape[0]
    model0 = nnx.merge(graphdef, params)
    dims = [module_at(model0, p).kernel.shape[1] for p in layers]
    eps0 = [jnp.zeros((n, d), x.dtype) for d in dims]

    def forward(eps):  # (logits, the chosen layers' inputs)
        model = nnx.merge(graphdef, params)
        taps = tap(model, layers, eps)
        return model(x), [t.x[...] for t in taps]

    def grads(labels):
        g = jax.grad(lambda e: cross_entropy(forward(e)[0], labels).sum())(eps0)
        return [d[:, None] for d in g]

    logits, xs = forward(eps0)
    ones = jnp.ones((n, 1), x.dtype)
    acts = [
        (jnp.concatenate([a, ones], axis=1) if _has_bias(module_at(model0, p)) else a)[:, None]
        for a, p in zip(xs, layers, strict=True)
    ]
    if fisher == "empirical":
        terms = [(jnp.ones(n, x.dtype), grads(batch["y"]))]
    elif fisher == "true":
        probs = jax.nn.softmax(logits)
        labels = [jnp.full_like(batch["y"], c) for c in range(logits.shape[1])]
        terms = [(probs[:, c], grads(lab)) for c, lab in enumerate(labels)]
    elif fisher == "sampled":
        terms = [(jnp.ones(n, x.dtype), grads(jax.random.categorical(key, logits)))]
    else:
        raise ValueError(
            f"fisher must be 'empirical', 'true' or 'sampled' for a classifier, got {fisher!r}"
        )
    out = acts, jnp.ones((n, 1), jnp.float32), terms
    if not with_data:
        return out
    return (*out, terms[0][1] if fisher == "empirical" else grads(batch["y"]))
