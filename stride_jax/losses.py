"""STRIDE's three stage-1 losses, each returning one value per subset (or one scalar).

- fidelity: steered cross-entropy on the subset's members (lower = operator k "trained on" S_k)
- stability: KL(base || steered) on non-members, truncated to the base model's top-K classes
  and renormalised over that set
- linearity: ridge residual of the per-subset loss drops against the sketched design A P

All are plain jnp functions; the step in train.py weights and sums them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def weighted_mean(x_KxB: jax.Array, w_KxB: jax.Array) -> jax.Array:
    return (x_KxB * w_KxB).sum(-1) / jnp.maximum(w_KxB.sum(-1), 1e-9)


def fidelity(logits_KxBxC: jax.Array, y_KxB: jax.Array, w_KxB: jax.Array) -> jax.Array:
    """Weighted mean cross-entropy per subset: (K,)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_KxBxC, y_KxB)
    return weighted_mean(ce, w_KxB)


def truncated_kl(base_logits_KxBxC, logits_KxBxC, top_k: int) -> jax.Array:
    """KL(p_base || p_steered) over the base top-K classes, both renormalised there: KxB."""
    top_k = min(top_k, base_logits_KxBxC.shape[-1])
    base_top, idx = jax.lax.top_k(base_logits_KxBxC, top_k)
    steer_top = jnp.take_along_axis(logits_KxBxC, idx, axis=-1)
    logp = jax.nn.log_softmax(base_top, -1)
    logq = jax.nn.log_softmax(steer_top, -1)
    return (jnp.exp(logp) * (logp - logq)).sum(-1)


def stability(base_logits_KxBxC, logits_KxBxC, w_KxB, top_k: int) -> jax.Array:
    """Weighted mean truncated KL per subset: (K,)."""
    return weighted_mean(truncated_kl(base_logits_KxBxC, logits_KxBxC, top_k), w_KxB)


def ridge_residual(y_KxP: jax.Array, x_KxM: jax.Array, ridge: float) -> jax.Array:
    """Mean over the P columns of ||y - X beta||^2 / K, beta the ridge fit of y on X.

    Unnormalised on purpose: it is in squared loss-drop units, so it cannot dominate an
    adaptive optimizer by being scale-free (it shrinks with the responses themselves).
    """
    k, m = x_KxM.shape
    gram = x_KxM.T @ x_KxM + ridge * jnp.eye(m, dtype=x_KxM.dtype)
    beta_MxP = jnp.linalg.solve(gram, x_KxM.T @ y_KxP)
    resid = y_KxP - x_KxM @ beta_MxP
    return (resid**2).sum(0).mean() / k


def linearity(drops_KxP: jax.Array, sketch_KxM: jax.Array, ridge: float) -> jax.Array:
    """Linearity loss: drops_KxP[k, p] = CE_base(p) - CE_k(p) on probe examples p.

    sketch_KxM = (A P)[subsets in the batch]: each subset's membership row times a fixed
    random projection P (N x M, M < K), i.e. a low-dimensional additive datamodel.
    """
    return ridge_residual(drops_KxP, sketch_KxM, ridge)
