"""Stage 2a: the (queries x T) response matrix in one fused, jitted, vmapped call.

``y_QxT[q, k] = CE_base(q) - CE_k(q)``: how much operator k (a stand-in for "trained more
on subset S_k") lowers query q's loss. ``_responses_one`` evaluates all T operators' logit
shifts (``ops.logit_shift``) on one query at once and turns them into drops (``ce_drop``);
``response_matrix`` vmaps it over query micro-batches (``lax.map``) so that memory stays at
(batch x T x C) however many queries there are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from stride_jax import sharding


def ce_drop(logits_C: jax.Array, delta_TxC: jax.Array, y) -> jax.Array:
    """``CE(logits) - CE(logits + delta_t)`` for each row t, computed from the shift alone:
    ``delta_y - log(sum_c p_c exp(delta_c)) = delta_y - log1p(sum_c p_c expm1(delta_c))``
    with p the base softmax. Subtracting two cross-entropies of size ~1 would lose the small
    drops (1e-4 and below) to float32 rounding; this keeps their relative precision."""
    p_C = jax.nn.softmax(logits_C)
    return delta_TxC[:, y] - jnp.log1p(jnp.expm1(delta_TxC) @ p_C)


def _responses_one(ops, cache_row, y, fixed):
    """y_T for one query (cache row: ``h`` (D,), ``logits`` (C,) and whatever else the
    operators' hook caches): every operator's logit shift, then ``ce_drop``."""
    rows = {k: v[None] for k, v in cache_row.items()}
    return ce_drop(cache_row["logits"], ops.logit_shift(rows, None, True, fixed)[:, 0], y)


@functools.lru_cache(maxsize=16)
def make_response_fn(graphdef, mesh, batch_size: int = 64):
    """Jitted ``(params, cache_Q, fixed, y_Q) -> y_QxT`` with queries sharded on ``data``.

    ``cache_Q`` maps names to Q x ... arrays (``h``, ``logits``, ...); ``fixed`` holds the
    hook's frozen weights (or None). Cached per (graphdef, mesh, batch size), so repeated
    calls do not recompile. Q must be a multiple of the mesh's data axis (``response_matrix``
    pads for you).
    """

    def fn(params, cache_Q, fixed, y_Q):
        ops = nnx.merge(graphdef, params)

        def one(args):
            row, y = args
            return _responses_one(ops, row, y, fixed)

        return jax.lax.map(one, (cache_Q, y_Q), batch_size=batch_size)

    rows = sharding.along(mesh, sharding.DATA, 2)
    return jax.jit(
        fn,
        in_shardings=(
            sharding.replicated(mesh),
            rows,
            sharding.replicated(mesh),
            sharding.along(mesh, sharding.DATA, 1),
        ),
        out_shardings=rows,
    )


def response_matrix(
    graphdef, params, cache_q: dict, y_Q, mesh, batch_size: int = 64, fixed=None
) -> jax.Array:
    """Response matrix y_QxT (float32) for queries with cached base activations ``cache_q``
    (every entry Q x D; ``fixed``: the hook's frozen weights, e.g. ``HiddenHook.fixed``)."""
    n_data = mesh.shape[sharding.DATA]
    padded = {k: sharding.pad_to_multiple(jnp.asarray(v), n_data)[0] for k, v in cache_q.items()}
    y, q = sharding.pad_to_multiple(jnp.asarray(y_Q), n_data)
    params = jax.device_put(params, sharding.replicated(mesh))
    out = make_response_fn(graphdef, mesh, batch_size)(params, padded, fixed, y)
    return out[:q]
