"""Token-level inputs and output gradients of a decoder's dense layers (LoGRA, EK-FAC).

A dense kernel W (in x out) at module path ``p`` (e.g. ``"layers/1/mlp/fc"``) has per-row
gradient G = sum_t x_t g_t^T, with x_t the layer's input at token t and g_t the gradient of
the row's loss w.r.t. the layer's output there. ``layer_io`` returns those x and g for
several layers at once by swapping each layer for a tap that records its input and adds a
zero ``eps`` to its output (the gradient w.r.t. eps is g), so G is never formed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stride_jax.errors import ConfigError
from stride_jax.func.grads import padded_chunks, partition


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


def layer_io(graphdef, params, paths, rows: dict, key=None):
    """[(x_BxLxI inputs, g_BxLxO output gradients)] of the dense layers at ``paths``.

    g is the gradient of the row's mean target CE (``lm_train.example_losses``) w.r.t. the
    layer output, so the row's kernel gradient is ``x^T g``; with ``key``, the targets are
    sampled from the model's own predictive distribution instead of the data (true Fisher).
    """
    tokens, B, L = rows["tokens"], *rows["tokens"].shape
    eps0 = [jnp.zeros((B, L, kernel_shape(params, p)[1])) for p in paths]

    def loss(eps):
        model, taps = nnx.merge(graphdef, params), []
        for path, e in zip(paths, eps, strict=True):
            *parents, name = path.split("/")
            owner = model
            for part in parents:
                owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
            taps.append(Tap(getattr(owner, name), e))
            setattr(owner, name, taps[-1])
        logits = model(tokens, rows["attn"])[:, :-1]
        targets = tokens[:, 1:]
        if key is not None:
            targets = jax.random.categorical(key, jax.lax.stop_gradient(logits))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        w = rows["loss_mask"][:, 1:]
        row_loss = (ce * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)
        return row_loss.sum(), [t.x[...] for t in taps]

    g, xs = jax.grad(loss, has_aux=True)(eps0)
    return list(zip(xs, g, strict=True))


@functools.partial(jax.jit, static_argnames=("graphdef", "paths", "chunk"))
def covariances(graphdef, params, paths, data: dict, chunk: int, key=None):
    """[(A_IxI, S_OxO)]: token-level E[x x^T] over real tokens and E[g g^T] per real token."""
    chunks = padded_chunks(data, chunk)
    n_tok = data["attn"].sum()

    def body(acc, xs):
        rows, c = xs
        k = None if key is None else jax.random.fold_in(key, c)
        io = layer_io(graphdef, params, paths, rows, k)
        m = rows["attn"][..., None].astype(jnp.float32)
        return [
            (a + jnp.einsum("bti,btj->ij", x * m, x), s + jnp.einsum("bto,btp->op", g, g))
            for (a, s), (x, g) in zip(acc, io, strict=True)
        ], None

    init = [
        (jnp.zeros((i, i)), jnp.zeros((o, o))) for i, o in (kernel_shape(params, p) for p in paths)
    ]
    nc = chunks["tokens"].shape[0]
    acc, _ = jax.lax.scan(body, init, (chunks, jnp.arange(nc)))
    return [(a / n_tok, s / n_tok) for a, s in acc]
