"""Per-row gradients of a task's pure functions over a parameter subset, flattened, in chunks.

Methods differentiate a per-row function (``task.loss`` or ``task.output``'s f) with respect
to the parameters named by ``task.param_names(cfg)``, the others held fixed. ``names=None``
means every parameter, flattened in ``ravel_pytree(params)`` order (what TRAK's projection of
a classifier's gradients is defined on); otherwise the chosen leaves form a ``{path: leaf}``
dict, flattened in sorted-path order. Rows are processed ``chunk`` at a time (``lax.map``
over padded chunks of ``vmap``-ped rows), so memory stays at chunk x P however many rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from stride_jax.task import path_str

HIGHEST = jax.lax.Precision.HIGHEST


def partition(params, names):
    """(chosen params, ``merge``: chosen -> full params with the others fixed). ``names=None``
    chooses the whole tree (``merge`` is the identity); else chosen is ``{path: leaf}``."""
    if names is None:
        return params, lambda new: new
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    pairs = [(path_str(p), v) for p, v in flat]
    chosen = {k: v for k, v in pairs if k in names}

    def merge(new):
        return jax.tree_util.tree_unflatten(treedef, [new.get(k, v) for k, v in pairs])

    return chosen, merge


def num_params(params, names) -> int:
    """P: the number of scalars in the chosen parameters."""
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(partition(params, names)[0]))


def num_rows(data: dict) -> int:
    return jax.tree.leaves(data)[0].shape[0]


def chunk_size(n: int, chunk: int) -> int:
    """Rows per chunk of ``padded_chunks`` over ``n`` rows: ``chunk``, at least 1, at most n."""
    return max(1, min(int(chunk), n))


def padded_chunks(data: dict, chunk: int) -> dict:
    """Rows reshaped to (num_chunks, chunk, ...); zero rows pad the end (a zero decoder row
    has no target token, so its loss is 0)."""
    n = num_rows(data)
    chunk = chunk_size(n, chunk)
    pad = -n % chunk

    def fold(a):
        a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape(-1, chunk, *a.shape[1:])

    return jax.tree.map(fold, data)


def map_rows(fn, data: dict, chunk: int):
    """``fn(rows of one chunk) -> chunk x ...`` (any pytree) over all N rows (``lax.map``),
    the padding dropped."""
    n = num_rows(data)
    out = jax.lax.map(fn, padded_chunks(data, chunk))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


def row_grads(fn, params, names, rows: dict) -> jax.Array:
    """g_BxP: per-row gradients of ``fn(params, batch) -> B`` w.r.t. the chosen params
    (``vmap`` of ``grad`` on one-row batches), flattened."""
    chosen, merge = partition(params, names)

    def one(row):
        batch = jax.tree.map(lambda a: a[None], row)
        return ravel_pytree(jax.grad(lambda c: fn(merge(c), batch)[0])(chosen))[0]

    return jax.vmap(one)(rows)


def loss_grads(task, params, names, rows: dict) -> jax.Array:
    """g_BxP of the per-row loss ``task.loss``."""
    return row_grads(task.loss, params, names, rows)


def output_grads(task, params, names, rows: dict) -> jax.Array:
    """g_BxP of TRAK's output function (``task.output``'s f)."""
    return row_grads(lambda p, b: task.output(p, b)[0], params, names, rows)


def unit(g_BxP: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit length (``eps`` keeps a zero gradient at zero)."""
    return g_BxP / (jnp.linalg.norm(g_BxP, axis=-1, keepdims=True) + eps)


def dot_scores(task, params, names, train: dict, query: dict, chunk: int, normalize: bool):
    """scores_QxN = g_q . g_i of per-row loss gradients (unit-normalised: cosine), training
    rows ``chunk`` at a time; jittable (``task`` is closed over)."""
    prep = unit if normalize else (lambda g: g)
    g_QxP = map_rows(lambda r: prep(loss_grads(task, params, names, r)), query, chunk)

    def dots(rows):
        g_BxP = prep(loss_grads(task, params, names, rows))
        return jnp.matmul(g_BxP, g_QxP.T, precision=HIGHEST)

    return map_rows(dots, train, chunk).T
