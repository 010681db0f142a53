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
def make_response_fn(graphdef, mesh, batch_size: int, params_treedef, params_specs: tuple):
    """Jitted ``(params, cache_Q, fixed, y_Q) -> y_QxT`` with queries split over ``data`` and
    operators over ``ops``: each device runs its queries (``lax.map`` over micro-batches of
    ``batch_size``) against its own operators.

    ``cache_Q`` maps names to Q x ... arrays (``h``, ``logits``, ...); ``fixed`` holds the
    hook's frozen weights (or None); ``params_specs`` are the operators' leaf specs
    (``sharding.operator_specs``, flattened with ``params_treedef``). Cached per (graphdef,
    mesh, batch size, specs), so repeated calls do not recompile. Q must be a multiple of the
    mesh's data axis and T of its ops axis (``response_matrix`` pads for you).
    """
    specs = jax.tree_util.tree_unflatten(params_treedef, params_specs)

    def local(params, cache_Q, fixed, y_Q):
        ops = nnx.merge(graphdef, params)

        def one(args):
            row, y = args
            return _responses_one(ops, row, y, fixed)

        return jax.lax.map(one, (cache_Q, y_Q), batch_size=batch_size)

    rows, rep = sharding.spec(sharding.DATA), sharding.spec()
    out = sharding.spec(sharding.DATA, sharding.OPS)
    fn = sharding.shard_map(local, mesh, (specs, rows, rep, rows), out)
    return sharding.jit(
        fn,
        (
            sharding.named(mesh, specs),
            sharding.named(mesh, rows),
            sharding.replicated(mesh),
            sharding.named(mesh, rows),
        ),
        sharding.named(mesh, out),
    )


def response_matrix(
    graphdef, params, cache_q: dict, y_Q, mesh, batch_size: int = 64, fixed=None
) -> jax.Array:
    """Response matrix y_QxT (float32) for queries with cached base activations ``cache_q``
    (every entry Q x D; ``fixed``: the hook's frozen weights, e.g. ``HiddenHook.fixed``),
    queries split over the mesh's ``data`` axis and operators over ``ops`` (both padded)."""
    n_data = sharding.size(mesh, sharding.DATA)
    padded = {k: sharding.pad_to_multiple(jnp.asarray(v), n_data)[0] for k, v in cache_q.items()}
    y, q = sharding.pad_to_multiple(jnp.asarray(y_Q), n_data)
    t = nnx.merge(graphdef, params).num_subsets
    n_ops = sharding.size(mesh, sharding.OPS)
    params = sharding.pad_operators(params, t, n_ops)
    specs, treedef = sharding.flat_specs(sharding.operator_specs(params, -(-t // n_ops) * n_ops))
    out = make_response_fn(graphdef, mesh, batch_size, treedef, specs)(params, padded, fixed, y)
    return out[:q, :t]
