"""STRIDE on language models: steering operators on the residual stream after layer l.

The decoder is frozen. Its residual stream after ``layer`` blocks is cached once for every
training block (``encode``); operator k adds ``delta_k(h) = B_k SiLU(W_down LN(h))`` to it at
every token, and the layers above l, the final norm and the head turn the steered stream
into next-token predictions. Cross-entropy over the vocabulary runs in chunks
(``losses.chunked_token_ce``) so (operators x tokens x vocab) logits never exist at once, and
the stability KL needs only the base model's top-K logits (cached) and the steered logits at
those K token ids (one gathered dot product each).

Stage 1 is ``stage1.fit_operators`` (optimizer, losses, sharding, orbax resume) on
``LMInputs``, which continue the steered residual stream through the upper layers; stage 2
evaluates all T operators per query in one jitted call (operators in chunks of ``op_chunk``
vmapped rows, queries with ``lax.map``), then the shared Lasso.
Fidelity, stability and query losses all count only target tokens (``loss_mask``: for SFT the
response tokens), and a row's loss is the mean over its target tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax import sharding
from stride_jax.models import transformer
from stride_jax.stride import losses, operators, subsets
from stride_jax.stride.operators import SteeringOperators


@dataclasses.dataclass(frozen=True)
class Upper:
    """The frozen decoder above the hook: static parts (hashable) for jit.

    ``compute_dtype``: its linear layers' (``precision``; the final norm, the vocabulary head,
    log-softmax and cross-entropy stay float32). ``remat``: checkpoint each upper block under
    the stage-1 gradient (``transformer.normed_from``), trading one more forward of the upper
    blocks for their activations' memory; the responses take no gradient, so it does not
    change them."""

    graphdef: object
    layer: int
    vocab_chunk: int
    compute_dtype: str = "float32"
    remat: bool = False

    def normed(self, params, h_BxLxD, attn_BxL) -> jax.Array:
        """The upper blocks and the final norm from residual h at ``layer``: hn_BxLxD."""
        return transformer.normed_from(
            self.graphdef, params, h_BxLxD, attn_BxL, self.layer, self.compute_dtype, self.remat
        )

    def row_losses(self, params, h_BxLxD, attn_BxL, tokens_BxL, loss_mask_BxL) -> jax.Array:
        """Mean target-token CE of each row continued from residual h at ``layer``: (B,)."""
        hn = self.normed(params, h_BxLxD, attn_BxL)
        return self.losses_from_normed(params, hn, tokens_BxL, loss_mask_BxL)

    def losses_from_normed(self, params, hn, tokens_BxL, loss_mask_BxL) -> jax.Array:
        """``row_losses`` from the final-normed stream hn_BxLxD (the head and the CE)."""
        w_dv = transformer.head_matrix(self.graphdef, params)
        b, length, d = hn.shape
        ce = losses.chunked_token_ce(
            hn[:, :-1].reshape(-1, d), w_dv, tokens_BxL[:, 1:].reshape(-1), self.vocab_chunk
        ).reshape(b, length - 1)
        w = loss_mask_BxL[:, 1:].astype(ce.dtype)
        return (ce * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)

    def row_kl(self, params, h, attn, top_idx_BxLxK, top_val_BxLxK, loss_mask_BxL):
        """Mean truncated top-K KL(base || steered) over each row's target positions: (B,)."""
        hn = self.normed(params, h, attn)
        w_vd = transformer.head_matrix(self.graphdef, params).T
        steer = jnp.einsum("bld,blkd->blk", hn, w_vd[top_idx_BxLxK])
        logp = jax.nn.log_softmax(top_val_BxLxK, -1)
        kl = (jnp.exp(logp) * (logp - jax.nn.log_softmax(steer, -1))).sum(-1)[:, :-1]
        w = loss_mask_BxL[:, 1:].astype(kl.dtype)
        return (kl * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)

    def sampled_top_k_ce(self, params, hn_LxD, top_idx_LxK, labels_L, loss_mask_L) -> jax.Array:
        """One row's truncated top-K cross-entropy against labels ``labels_L`` (indices into
        the K cached ids) drawn from the base model, summed over target positions and divided
        by the square root of their number. With labels drawn independently per position,
        ``E[g g^T]`` of its gradient g (in anything upstream) is the Gauss-Newton matrix of
        ``row_kl`` at the base model: the model's own (true) Fisher, not the data's."""
        w_vd = transformer.head_matrix(self.graphdef, params).T
        steer = jnp.einsum("ld,lkd->lk", hn_LxD, w_vd[top_idx_LxK])
        logp = jnp.take_along_axis(jax.nn.log_softmax(steer, -1), labels_L[:, None], -1)[:, 0]
        w = loss_mask_L[1:].astype(logp.dtype)
        return -(logp[:-1] * w).sum() / jnp.sqrt(jnp.maximum(w.sum(), 1.0))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "model_params",
        "h_NxLxD",
        "attn_NxL",
        "tokens_NxL",
        "loss_mask_NxL",
        "ce_base_N",
        "top_idx_NxLxK",
        "top_val_NxLxK",
        "members_TxS",
        "subsets_NxD",
        "sketch_TxM",
        "fisher_key",
    ],
    meta_fields=["upper", "newton_batch", "fisher_samples"],
)
@dataclasses.dataclass(frozen=True)
class LMInputs:
    """Everything stage 1 reads: frozen model, cached base activations, design and sketch."""

    upper: Upper
    model_params: object
    h_NxLxD: jax.Array
    attn_NxL: jax.Array
    tokens_NxL: jax.Array
    loss_mask_NxL: jax.Array
    ce_base_N: jax.Array
    top_idx_NxLxK: jax.Array
    top_val_NxLxK: jax.Array
    members_TxS: jax.Array
    subsets_NxD: jax.Array
    sketch_TxM: jax.Array
    # The Gauss-Newton start (``newton``): uint32 key data for the sampled labels, rows per
    # curvature chunk, sampled label sequences per row.
    fisher_key: jax.Array = None
    newton_batch: int = 16
    fisher_samples: int = 1

    def _steered(self, ops: SteeringOperators, rows, ids, shared: bool):
        """(residual + shift) of operators ``ids`` on rows ``rows`` (B shared by all K, or
        K x B), flattened to K*B rows, with those rows' attention, tokens and loss masks."""
        h = self.h_NxLxD[rows]
        if shared:
            h = h[None] + ops.shifts(ops.basis(h), ids)
            rows = jnp.broadcast_to(rows, h.shape[:2])
        else:
            h = h + ops.shifts_per_row(ops.basis(h), ids)
        flat = rows.reshape(-1)
        h = h.reshape(-1, *h.shape[2:])
        return h, self.attn_NxL[flat], self.tokens_NxL[flat], self.loss_mask_NxL[flat], flat

    def steered_losses(self, ops, rows, ids, shared: bool) -> jax.Array:
        """K x B mean target-token CE of the rows continued from the steered residual."""
        h, attn, tok, lm, _ = self._steered(ops, rows, ids, shared)
        ce = self.upper.row_losses(self.model_params, h, attn, tok, lm)
        return ce.reshape(-1, rows.shape[-1])

    def steered_kl(self, ops, rows, ids, shared: bool) -> jax.Array:
        """K x B mean truncated top-K KL(base || steered) over each row's target positions."""
        h, attn, _, lm, flat = self._steered(ops, rows, ids, shared)
        kl = self.upper.row_kl(
            self.model_params, h, attn, self.top_idx_NxLxK[flat], self.top_val_NxLxK[flat], lm
        )
        return kl.reshape(-1, rows.shape[-1])

    def base_losses(self, rows) -> jax.Array:
        return self.ce_base_N[rows]

    @property
    def num_rows(self) -> int:
        return self.h_NxLxD.shape[0]

    def newton_sites(self, ops) -> list:
        """``[(ops, D, R)]``: one site, the residual stream (``newton``)."""
        return [(ops, *ops.gates[...].shape[1:])]

    def row_gradients(self, ops, i, key=None, samples: int = 0):
        """Row ``i``'s gradients in the gates of one operator at zero gates (P = D*R, laid
        out as the gates): of its loss (target-token mean CE), and with a ``key``, of
        ``samples`` truncated top-K CEs against labels drawn from the base model
        (``Upper.sampled_top_k_ce``). One forward through the upper blocks, and one backward
        per gradient: ``sum_t u_t phi_t^T`` with u_t the gradient in the residual at token t."""
        params, upper = self.model_params, self.upper
        h, attn = self.h_NxLxD[i], self.attn_NxL[i]
        tok, lm = self.tokens_NxL[i], self.loss_mask_NxL[i]
        hn, vjp = jax.vjp(lambda x: upper.normed(params, x[None], attn[None])[0], h)
        cot = jax.grad(lambda z: upper.losses_from_normed(params, z[None], tok[None], lm[None])[0])(
            hn
        )[None]
        if key is not None and samples > 0:
            top_idx = self.top_idx_NxLxK[i]
            labels = jax.random.categorical(
                jax.random.fold_in(key, i), self.top_val_NxLxK[i], shape=(samples, h.shape[0])
            )

            def sampled(y_L):
                return jax.grad(lambda z: upper.sampled_top_k_ce(params, z, top_idx, y_L, lm))(hn)

            cot = jnp.concatenate([cot, jax.vmap(sampled)(labels)])
        u_SxLxD = jax.vmap(lambda c: vjp(c)[0])(cot)
        phi_LxR = ops.basis(h)
        return jnp.einsum("sld,lr->sdr", u_SxLxD, phi_LxR).reshape(cot.shape[0], -1)

    def newton_stats(self, ops, idx_B, valid_B):
        """(the curvature P x P summed over rows ``idx_B`` where ``valid_B``, as the one block
        D x R x D x R; their loss gradients B x P). The curvature is the true Fisher of the
        truncated KL, estimated from ``fisher_samples`` label sequences per row drawn from
        the base model's top-K (``row_gradients``): the exact Gauss-Newton matrix would need
        K*L backward passes per row through the upper blocks."""
        key = jax.random.wrap_key_data(self.fisher_key)
        s = self.fisher_samples
        g_BxSxP = jax.vmap(lambda i: self.row_gradients(ops, i, key, s))(idx_B)
        w = valid_B.astype(g_BxSxP.dtype)
        fis = g_BxSxP[:, 1:] * w[:, None, None]
        d, r = ops.gates[...].shape[1:]
        h_PxP = jnp.einsum("bsp,bsq->pq", fis, fis) / s
        return {(0, 0): h_PxP.reshape(d, r, d, r)}, g_BxSxP[:, 0] * w[:, None]

    def with_frozen_basis(self, ops) -> LMInputs:
        """Unchanged: the basis is evaluated per sampled row (N x L x r features would be
        large), frozen or not."""
        del ops
        return self


def encode(
    graphdef,
    params,
    data: dict,
    layer: int,
    top_k: int,
    vocab_chunk: int,
    batch: int,
    mesh=None,
    compute_dtype: str = "float32",
):
    """Base-model cache for rows ``data`` (tokens/attn/loss_mask N x L), ``batch`` at a time,
    the rows split over every device of ``mesh`` (default: one device; N is padded), the
    linear layers in ``compute_dtype`` (``precision``).

    Returns ``h`` (N x L x D, residual after ``layer``), ``ce`` (N,) the base row losses,
    ``top_idx``/``top_val`` (N x L x K) the base model's top-K next-token logits.
    """
    mesh = mesh if mesh is not None else sharding.make_mesh()
    n = data["tokens"].shape[0]
    padded = {k: sharding.pad_to_multiple(v, sharding.size(mesh))[0] for k, v in data.items()}
    fn = _encode_fn(graphdef, layer, top_k, vocab_chunk, batch, mesh, compute_dtype)
    out = fn(params, padded)
    return {k: v[:n] for k, v in out.items()}


@functools.lru_cache(maxsize=8)
def _encode_fn(graphdef, layer: int, top_k: int, vocab_chunk: int, batch: int, mesh, dtype):
    upper = Upper(graphdef, layer, vocab_chunk, dtype)

    def local(params, data):
        def one(row):
            tok, attn, lm = row["tokens"][None], row["attn"][None], row["loss_mask"][None]
            h = transformer.hidden_at(graphdef, params, tok, attn, layer, dtype)
            hn = upper.normed(params, h, attn)
            logits = hn @ transformer.head_matrix(graphdef, params)
            val, idx = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))
            ce = upper.row_losses(params, h, attn, tok, lm)
            return {"h": h[0], "ce": ce[0], "top_idx": idx[0], "top_val": val[0]}

        return jax.lax.map(one, data, batch_size=batch)

    rows, rep = sharding.spec(sharding.EVERY), sharding.spec()
    fn = sharding.shard_map(local, mesh, (rep, rows), rows)
    every = sharding.over_every(mesh)
    return sharding.jit(fn, (sharding.replicated(mesh), every), every)


def make_inputs(upper: Upper, model_params, cache, data: dict, design, config, key) -> LMInputs:
    """Bundle the cache, the design and its sketch (features: mean-pooled residual)."""
    attn = data["attn"].astype(jnp.float32)
    pooled_NxD = (cache["h"] * attn[..., None]).sum(1) / jnp.maximum(attn.sum(1), 1.0)[:, None]
    return dataclasses.replace(
        row_inputs(upper, model_params, cache, data),
        members_TxS=jnp.asarray(design.members_TxS),
        subsets_NxD=jnp.asarray(design.subsets_NxD),
        sketch_TxM=subsets.sketched_design(design, config, key, pooled_NxD),
        fisher_key=_key_data(jax.random.fold_in(key, 1)),
        newton_batch=int(config.get("curvature_batch", 0) or LMInputs.newton_batch),
        fisher_samples=int(config.get("fisher_samples", 1)),
    )


def token_basis(h_NxLxD, mask_NxL, rank: int, scale: float, kind: str, max_tokens: int = 65536):
    """A frozen ``w_down`` (D x rank) from the hooked residual's tokens (``mask``: real
    tokens): the top principal directions of LN(h) (``operators.whitened_basis``; "pca"
    keeps their spread, "whitened" equalises it), from at most ``max_tokens`` tokens drawn
    with a fixed seed."""
    h = np.asarray(h_NxLxD, np.float32)[np.asarray(mask_NxL, bool)]
    if h.shape[0] > max_tokens:
        h = h[np.random.default_rng(0).choice(h.shape[0], max_tokens, replace=False)]
    return operators.whitened_basis(h, rank, scale, whiten=kind == "whitened")


def row_inputs(upper: Upper, model_params, cache, data: dict) -> LMInputs:
    """``LMInputs`` over any rows (e.g. queries) for their gradients in the gates
    (``newton.curvature_and_gradients(...)[1]``): no design (one empty subset), no sampled
    Fisher (``fisher_samples = 0``)."""
    n = cache["h"].shape[0]
    return LMInputs(
        upper=upper,
        model_params=model_params,
        h_NxLxD=cache["h"],
        attn_NxL=data["attn"],
        tokens_NxL=data["tokens"],
        loss_mask_NxL=data["loss_mask"],
        ce_base_N=cache["ce"],
        top_idx_NxLxK=cache["top_idx"],
        top_val_NxLxK=cache["top_val"],
        members_TxS=jnp.full((1, 1), n, jnp.int32),
        subsets_NxD=jnp.zeros((n, 1), jnp.int32),
        sketch_TxM=jnp.zeros((1, 1), jnp.float32),
        fisher_key=jnp.zeros((2,), jnp.uint32),
        fisher_samples=0,
    )


def _key_data(key) -> jax.Array:
    """uint32 key data of a typed or a legacy (raw uint32) key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def response_matrix(
    upper: Upper, model_params, ops_graphdef, ops_params, cache_q, data_q, config, mesh=None
):
    """y_QxT = CE_base(q) - CE_k(q) for every query row and operator, one jitted call with
    queries split over the ``data`` axis of ``mesh`` and operators over ``ops`` (default: one
    device; both padded)."""
    mesh = mesh if mesh is not None else sharding.make_mesh()
    n_data, n_ops = sharding.size(mesh, sharding.DATA), sharding.size(mesh, sharding.OPS)
    num_subsets = ops_params["gates"][...].shape[0]
    local_t = -(-num_subsets // n_ops)
    op_chunk = min(config.op_chunk, local_t)
    params = sharding.pad_operators(ops_params, num_subsets, n_ops)
    specs, treedef = sharding.flat_specs(sharding.operator_specs(params, local_t * n_ops))
    h_QxLxD, q = sharding.pad_to_multiple(cache_q["h"], n_data)
    data_q = {k: sharding.pad_to_multiple(v, n_data)[0] for k, v in data_q.items()}
    fn = _response_fn(
        upper, ops_graphdef, local_t, op_chunk, config.query_batch, mesh, treedef, specs
    )
    return fn(model_params, params, h_QxLxD, data_q)[:q, :num_subsets]


@functools.lru_cache(maxsize=8)
def _response_fn(
    upper: Upper, ops_graphdef, local_t: int, op_chunk: int, query_batch: int, mesh, treedef, specs
):
    """Per device: its queries (``lax.map``, ``query_batch`` at a time) against its
    ``local_t`` operators (``lax.map`` over chunks of ``op_chunk``)."""
    n_chunks = -(-local_t // op_chunk)
    ids_CxK = jnp.minimum(jnp.arange(n_chunks * op_chunk), local_t - 1).reshape(n_chunks, -1)

    def local(model_params, ops_params, h_QxLxD, data_q):
        ops = nnx.merge(ops_graphdef, ops_params)

        def one_query(args):
            h, row = args
            attn, tok, lm = row["attn"][None], row["tokens"][None], row["loss_mask"][None]
            base = upper.row_losses(model_params, h[None], attn, tok, lm)[0]
            phi_LxR = ops.basis(h)

            def one_chunk(ids_K):
                h_k = h[None] + ops.shifts(phi_LxR, ids_K)
                kk = ids_K.shape[0]

                def tile(x):
                    return jnp.broadcast_to(x, (kk, *x.shape[1:]))

                return upper.row_losses(model_params, h_k, tile(attn), tile(tok), tile(lm))

            ce_T = jax.lax.map(one_chunk, ids_CxK).reshape(-1)[:local_t]
            return base - ce_T

        return jax.lax.map(one_query, (h_QxLxD, data_q), batch_size=query_batch)

    ops_specs = jax.tree_util.tree_unflatten(treedef, specs)
    rows, rep = sharding.spec(sharding.DATA), sharding.spec()
    out = sharding.spec(sharding.DATA, sharding.OPS)
    fn = sharding.shard_map(local, mesh, (rep, ops_specs, rows, rows), out)
    return sharding.jit(
        fn,
        (
            sharding.replicated(mesh),
            sharding.named(mesh, ops_specs),
            sharding.named(mesh, rows),
            sharding.named(mesh, rows),
        ),
        sharding.named(mesh, out),
    )
