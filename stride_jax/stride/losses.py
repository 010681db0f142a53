"""STRIDE's three stage-1 losses, each returning one value per subset (or one scalar).

- fidelity: steered cross-entropy on the subset's members (lower = operator k "trained on" S_k)
- stability: KL(base || steered) on non-members, truncated to the base model's top-K classes
  and renormalised over that set
- linearity: ridge residual of the per-subset loss drops against the sketched design A P

plus the memory-efficient token cross-entropy for language models (``chunked_token_ce``),
which never materialises (tokens x vocab) logits at once. All are plain jnp functions; the
stage-1 steps (stage1.py) weight and sum them.
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


def base_top_k(base_logits_BxC: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """The base model's top-K class ids and their log-probabilities renormalised over those K
    (``idx_BxK`` int32, ``logp_BxK``): computed once, reused by every stability evaluation."""
    top_k = min(top_k, base_logits_BxC.shape[-1])
    base_top, idx = jax.lax.top_k(base_logits_BxC, top_k)
    return idx, jax.nn.log_softmax(base_top, -1)


def top_k_kl(idx_BxK: jax.Array, logp_BxK: jax.Array, logits_KxBxC: jax.Array) -> jax.Array:
    """KL(p_base || p_steered) over cached base top-K classes (``base_top_k``): KxB.

    ``idx``/``logp`` broadcast against the leading axes of ``logits`` (e.g. one cached row
    set shared by all K operators)."""
    shape = (*logits_KxBxC.shape[:-1], idx_BxK.shape[-1])
    steer_top = jnp.take_along_axis(logits_KxBxC, jnp.broadcast_to(idx_BxK, shape), axis=-1)
    logq = jax.nn.log_softmax(steer_top, -1)
    logp = jnp.broadcast_to(logp_BxK, shape)
    return (jnp.exp(logp) * (logp - logq)).sum(-1)


def truncated_kl(base_logits_KxBxC, logits_KxBxC, top_k: int) -> jax.Array:
    """KL(p_base || p_steered) over the base top-K classes, both renormalised there: KxB."""
    return top_k_kl(*base_top_k(base_logits_KxBxC, top_k), logits_KxBxC)


def stability(base_logits_KxBxC, logits_KxBxC, w_KxB, top_k: int) -> jax.Array:
    """Weighted mean truncated KL per subset: (K,)."""
    return weighted_mean(truncated_kl(base_logits_KxBxC, logits_KxBxC, top_k), w_KxB)


def ridge_residual(y_KxP: jax.Array, x_KxM: jax.Array, ridge: float, w_KxP=None) -> jax.Array:
    """Mean over the P columns of the (row-weighted) ridge residual ||y - X beta||^2 / sum(w).

    Each column p has its own fit on the rows with weight ``w_KxP[:, p]`` (all ones if None).
    Unnormalised on purpose: it is in squared loss-drop units, so it cannot dominate an
    adaptive optimizer by being scale-free (it shrinks with the responses themselves).
    """
    if w_KxP is None:
        w_KxP = jnp.ones_like(y_KxP)
    m = x_KxM.shape[1]
    gram_PxMxM = jnp.einsum("kp,km,kn->pmn", w_KxP, x_KxM, x_KxM) + ridge * jnp.eye(m)
    rhs_PxM = jnp.einsum("kp,km,kp->pm", w_KxP, x_KxM, y_KxP)
    beta_PxM = jnp.linalg.solve(gram_PxMxM, rhs_PxM[..., None])[..., 0]
    resid_KxP = y_KxP - jnp.einsum("km,pm->kp", x_KxM, beta_PxM)
    per_col = (w_KxP * resid_KxP**2).sum(0) / jnp.maximum(w_KxP.sum(0), 1.0)
    return per_col.mean()


def linearity(drops_KxP: jax.Array, sketch_KxM: jax.Array, ridge: float, w_KxP=None):
    """Linearity loss: drops_KxP[k, p] = CE_base(p) - CE_k(p) on probe examples p.

    sketch_KxM = (A P)[subsets in the batch]: each subset's membership row times a fixed
    projection P (N x M, M < K), i.e. a low-dimensional additive datamodel. ``w_KxP`` masks
    rows out of probe p's fit (e.g. subsets that contain p, whose self-effect no sketch holds).
    """
    return ridge_residual(drops_KxP, sketch_KxM, ridge, w_KxP)


def chunked_token_ce(hn_NxD: jax.Array, w_DxV: jax.Array, targets_N: jax.Array, chunk: int):
    """Per-token cross-entropy ``logsumexp(hn W) - (hn W)[target]``: (N,) float32.

    The logsumexp runs over vocabulary chunks of ``chunk`` columns (a streaming max/sum), so
    at most N x chunk logits exist at once; the target logit is one gathered dot product.
    """
    d, v = w_DxV.shape
    n_chunks = -(-v // chunk)
    pad = n_chunks * chunk - v
    w_pad = jnp.pad(w_DxV, ((0, 0), (0, pad)))
    valid_CxK = (jnp.arange(n_chunks * chunk) < v).reshape(n_chunks, chunk)
    w_CxDxK = w_pad.reshape(d, n_chunks, chunk).transpose(1, 0, 2)

    def step(carry, xs):
        m, s = carry
        w, ok = xs
        z = jnp.where(ok, hn_NxD @ w, -jnp.inf)
        m_new = jnp.maximum(m, z.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(-1)
        return (m_new, s), None

    n = hn_NxD.shape[0]
    init = (jnp.full((n,), -jnp.inf, hn_NxD.dtype), jnp.zeros((n,), hn_NxD.dtype))
    # Rematerialised: the backward pass recomputes each chunk's logits instead of storing
    # them, so gradients too stay at N x chunk (not N x V) live logits.
    (m, s), _ = jax.lax.scan(jax.checkpoint(step), init, (w_CxDxK, valid_CxK))
    target_logit = jnp.einsum("nd,dn->n", hn_NxD, w_DxV[:, targets_N])
    return m + jnp.log(s) - target_logit
