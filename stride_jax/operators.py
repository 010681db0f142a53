"""Steering operators: what they compute, and (separately) where they attach.

What: a shared low-rank basis ``phi(h) = SiLU(W_down LN(h))`` (LayerNorm without affine
parameters) and, per subset k, a map from the r-dim basis to the output space:
``delta_k(h) = B_k phi(h)`` with ``B_k`` of shape (out_dim x r). ``B`` starts at zero, so
every operator starts as the identity (steered model == base model).

Where: a hook turns base-model activations into steered logits. ``LogitHook`` is the
paper's classifier variant: ``logits_k = logits + delta_k(h)`` with h the penultimate
features. A residual-stream hook (language models) provides the same two methods.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


def layer_norm_noaffine(h_BxD: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = h_BxD.mean(-1, keepdims=True)
    var = h_BxD.var(-1, keepdims=True)
    return (h_BxD - mean) * jax.lax.rsqrt(var + eps)


class SteeringOperators(nnx.Module):
    """T steering operators sharing one rank-r basis.

    Params: ``w_down`` (feat_dim x rank), ``gates`` (T x out_dim x rank, zero-init).
    """

    def __init__(self, feat_dim: int, out_dim: int, rank: int, num_subsets: int, *, rngs):
        init = jax.nn.initializers.lecun_normal()
        self.w_down = nnx.Param(init(rngs.params(), (feat_dim, rank), jnp.float32))
        self.gates = nnx.Param(jnp.zeros((num_subsets, out_dim, rank), jnp.float32))

    def basis(self, h_BxD: jax.Array) -> jax.Array:
        """phi_BxR = SiLU(LN(h) W_down)."""
        return jax.nn.silu(layer_norm_noaffine(h_BxD) @ self.w_down[...])

    def shifts(self, phi_BxR: jax.Array, subset_ids_K: jax.Array | None = None) -> jax.Array:
        """delta_KxBxO for the operators ``subset_ids_K`` (all T when None).

        Any leading batch shape works (e.g. phi_BxLxR for tokens gives delta_KxBxLxO).
        """
        gates = self.gates[...]
        if subset_ids_K is not None:
            gates = gates[subset_ids_K]
        return jnp.einsum("kor,...r->k...o", gates, phi_BxR)

    def shifts_per_row(self, phi_KxBxR: jax.Array, subset_ids_K: jax.Array | None) -> jax.Array:
        """delta_KxBxO where operator k sees its own batch phi_KxBxR[k] (any batch shape);
        ``subset_ids_K=None`` means all T operators in order (no gather of the gates)."""
        gates = self.gates[...]
        if subset_ids_K is not None:
            gates = gates[subset_ids_K]
        return jnp.einsum("kor,k...r->k...o", gates, phi_KxBxR)

    def gate_sq_norms(self, subset_ids_K: jax.Array | None = None) -> jax.Array:
        """||B_k||_F^2 of the operators ``subset_ids_K`` (all T when None): (K,)."""
        gates = self.gates[...]
        if subset_ids_K is not None:
            gates = gates[subset_ids_K]
        return (gates**2).sum((1, 2))


@dataclasses.dataclass(frozen=True)
class LogitHook:
    """Attach operators to a classifier's logits; activations are cached once.

    ``encode`` runs the frozen base model: ``{"h": features_BxD, "logits": logits_BxC}``.
    """

    features_fn: callable
    logits_fn: callable

    def encode(self, x_BxF: jax.Array) -> dict[str, jax.Array]:
        return {"h": self.features_fn(x_BxF), "logits": self.logits_fn(x_BxF)}

    @staticmethod
    def steered_logits(cache: dict[str, jax.Array], delta_KxBxO: jax.Array) -> jax.Array:
        """logits_KxBxC = base logits + shift (cache arrays broadcast over K)."""
        return cache["logits"] + delta_KxBxO
