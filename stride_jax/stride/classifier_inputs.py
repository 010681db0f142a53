"""The classifier site's stage-1 inputs: the base model's activations cached once on the
training rows, with the design and its sketch (``residual.LMInputs`` is the decoder's)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from stride_jax.stride import losses, newton
from stride_jax.stride.subsets import Design, sketched_design


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "h_NxD",
        "logits_NxC",
        "y_N",
        "members_TxS",
        "subsets_NxD",
        "sketch_TxM",
        "top_idx_NxK",
        "top_logp_NxK",
        "extra_rows",
        "fixed",
    ],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class ClassifierInputs:
    """A classifier site's stage-1 inputs: cached base-model activations and the design.

    ``h_NxD`` features at the hook, ``logits_NxC`` base logits, ``y_N`` labels, ``sketch_TxM``
    the sketched design A P, ``top_idx_NxK`` / ``top_logp_NxK`` the base model's top-K classes
    and their renormalised log-probabilities (the stability loss's fixed side). ``extra_rows``
    holds further per-row activations a hook steers (``HiddenHook``: ``u``, ``a``) and
    ``fixed`` its frozen weights (or None).

    Stage 1 (``stage1``) reads every site's inputs through the same four methods
    (``residual.LMInputs`` is the residual stream's): ``steered_losses`` / ``steered_kl``
    (K x B per-row loss and truncated KL of operators ``ids`` on rows ``rows``: one row set
    B shared by all K operators, or K x B), ``base_losses`` (B) and ``with_frozen_basis``.
    """

    h_NxD: jax.Array
    logits_NxC: jax.Array
    y_N: jax.Array
    members_TxS: jax.Array
    subsets_NxD: jax.Array
    sketch_TxM: jax.Array
    top_idx_NxK: jax.Array
    top_logp_NxK: jax.Array
    extra_rows: dict = dataclasses.field(default_factory=dict)
    fixed: dict | None = None

    def rows(self, idx) -> dict:
        """The cached activations of rows ``idx`` (any index shape), as operators take them."""
        out = {"h": self.h_NxD[idx], "logits": self.logits_NxC[idx]}
        return out | {k: v[idx] for k, v in self.extra_rows.items()}

    def steered_losses(self, ops, rows, ids, shared: bool) -> jax.Array:
        logits = ops.steered_logits(self.rows(rows), ids, shared, self.fixed)
        y = jnp.broadcast_to(self.y_N[rows], logits.shape[:-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def steered_kl(self, ops, rows, ids, shared: bool) -> jax.Array:
        logits = ops.steered_logits(self.rows(rows), ids, shared, self.fixed)
        return losses.top_k_kl(self.top_idx_NxK[rows], self.top_logp_NxK[rows], logits)

    # The Gauss-Newton start (``newton``) reads every site's inputs through ``num_rows``,
    # ``newton_batch`` (rows per curvature chunk), ``newton_stats`` and ``newton_sites``.
    newton_batch = 256

    @property
    def num_rows(self) -> int:
        return self.y_N.shape[0]

    def newton_stats(self, ops, idx_B, valid_B):
        """(curvature blocks summed over rows ``idx_B`` where ``valid_B``, per-row fidelity
        gradients B x P): the classifier's exact truncated-KL Gauss-Newton matrix."""
        return newton.classifier_chunk_stats(ops, self, idx_B, valid_B)

    def newton_sites(self, ops) -> list:
        """``[(module, O, R)]``: each site's gate shape, in the gradients' order."""
        sites = ops.linear_sites(self.rows(jnp.zeros((1,), jnp.int32)), self.fixed)
        return [(m, l_s.shape[1], f_s.shape[1]) for m, l_s, f_s in sites]

    def base_losses(self, rows) -> jax.Array:
        z = self.logits_NxC[rows]
        return optax.softmax_cross_entropy_with_integer_labels(z, self.y_N[rows])

    def with_frozen_basis(self, ops) -> ClassifierInputs:
        """These inputs whose rows also carry the operators' basis features
        (``ops.basis_rows``) of every training row, computed once: with a frozen basis
        (``lr_muon = 0``) the steps then gather them instead of recomputing LN + projection
        (and its unused gradient) per row."""
        every = {"h": self.h_NxD, "logits": self.logits_NxC} | self.extra_rows
        feats = jax.lax.stop_gradient(ops.basis_rows(every))
        return dataclasses.replace(self, extra_rows=self.extra_rows | feats)


def make_inputs(cache, y_N, design: Design, config, key: jax.Array, fixed=None) -> ClassifierInputs:
    """Bundle the classifier's cached activations and the design with its sketch (cache
    entries other than ``h`` and ``logits`` go to ``extra_rows``)."""
    rows = row_inputs(cache, y_N, config.top_k, fixed)
    return dataclasses.replace(
        rows,
        members_TxS=jnp.asarray(design.members_TxS),
        subsets_NxD=jnp.asarray(design.subsets_NxD),
        sketch_TxM=sketched_design(design, config, key, cache["h"]),
    )


def row_inputs(cache, y_N, top_k: int, fixed=None) -> ClassifierInputs:
    """``ClassifierInputs`` over any rows (e.g. queries, labels ``y_N``) for their gradients
    in the gates (``newton.curvature_and_gradients(...)[1]``): no design (one empty subset)."""
    n = jnp.asarray(cache["h"]).shape[0]
    logits_NxC = jnp.asarray(cache["logits"])
    top_idx, top_logp = losses.base_top_k(logits_NxC, top_k)
    return ClassifierInputs(
        h_NxD=jnp.asarray(cache["h"]),
        logits_NxC=logits_NxC,
        y_N=jnp.asarray(y_N),
        members_TxS=jnp.full((1, 1), n, jnp.int32),
        subsets_NxD=jnp.zeros((n, 1), jnp.int32),
        sketch_TxM=jnp.zeros((1, 1), jnp.float32),
        top_idx_NxK=top_idx,
        top_logp_NxK=top_logp,
        extra_rows={k: jnp.asarray(v) for k, v in cache.items() if k not in ("h", "logits")},
        fixed=fixed,
    )
