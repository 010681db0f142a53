"""TRAK's random projection and its float64 kernel solve (shared by TRAK and LoGRA).

The projection R_PxK is Gaussian / sqrt(K), generated on device from a key in blocks of
``ROWS`` parameter rows (block r from ``fold_in(key, r)``), so any block can be regenerated
alone: kept whole when it fits, or regenerated block by block per gradient (``project``).
``ROWS`` is part of the projection's definition (changing it changes every TRAK score).

The kernel: W_NxK = diag(w) Phi (Phi^T Phi + lam I)^-1, solved in float64 (the Gram's
conditioning, ~1e5 / lam, is beyond float32), through the N x N dual system when N < K.
``lam`` is TRAK's absolute ridge (``damping_mode="absolute"``) or LoGRA's relative one
(``"relative"``: damping x the mean eigenvalue of Phi^T Phi, trace / K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.errors import ConfigError

ROWS = 1024  # parameter rows per projection block (part of the projection's definition)
HIGHEST = jax.lax.Precision.HIGHEST


def projection_key(seed: int, m: int) -> jax.Array:
    """The projection key of ensemble member m."""
    return jax.random.fold_in(jax.random.key(seed + m), 1)


def projection_block(key: jax.Array, r, k: int) -> jax.Array:
    """Rows [r * ROWS, (r + 1) * ROWS) of the projection, ROWS x K (deterministic in key, r)."""
    return jax.random.normal(jax.random.fold_in(key, r), (ROWS, k)) / np.sqrt(k)


def projection(key: jax.Array, num_params: int, k: int) -> jax.Array:
    """The projection R_PxK, built block by block (``lax.map`` over block ids)."""
    nblocks = -(-num_params // ROWS)
    blocks = jax.lax.map(lambda r: projection_block(key, r, k), jnp.arange(nblocks))
    return blocks.reshape(nblocks * ROWS, k)[:num_params]


def project(g_P: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """g_P @ R_PxK with R regenerated ROWS rows at a time (never whole in memory)."""
    nblocks = -(-g_P.shape[0] // ROWS)
    g_BxR = jnp.pad(g_P, (0, nblocks * ROWS - g_P.shape[0])).reshape(nblocks, ROWS)

    def body(acc_K, r):
        return acc_K + jnp.matmul(g_BxR[r], projection_block(key, r, k), precision=HIGHEST), None

    return jax.lax.scan(body, jnp.zeros(k, g_P.dtype), jnp.arange(nblocks))[0]


@jax.jit
def _kernel_weighted(phi_NxK, w_N, damping):
    """W_NxK = diag(w) Phi (Phi^T Phi + lam I)^-1, float64 (call under enable_x64)."""
    phi = phi_NxK.astype(jnp.float64)
    n, k = phi.shape
    if n < k:  # Phi (Phi^T Phi + lam I)^-1 = (Phi Phi^T + lam I)^-1 Phi
        w = jax.scipy.linalg.solve(phi @ phi.T + damping * jnp.eye(n), phi, assume_a="pos")
    else:
        w = jax.scipy.linalg.solve(phi.T @ phi + damping * jnp.eye(k), phi.T, assume_a="pos").T
    return (w * w_N.astype(jnp.float64)[:, None]).astype(jnp.float32)


def ridge(phi_NxK, damping: float, mode: str) -> float:
    """lam: ``damping`` itself (absolute) or damping x trace(Phi^T Phi) / K (relative)."""
    if mode == "absolute":
        lam = float(damping)
    elif mode == "relative":
        phi64 = np.asarray(phi_NxK, np.float64)
        lam = float(damping) * float(np.sum(phi64**2)) / phi64.shape[1]
    else:
        raise ConfigError(f"damping_mode must be 'absolute' or 'relative', got {mode!r}")
    if lam <= 0:
        raise ConfigError(f"damping must be > 0 and the gradients nonzero (lam = {lam})")
    return lam


def kernel_weights(phi_NxK, w_N, damping: float, mode: str) -> jax.Array:
    """W_NxK (float32) of features phi_NxK with row reweighting w_N (see the module doc)."""
    lam = ridge(phi_NxK, damping, mode)
    with jax.enable_x64(True):
        return _kernel_weighted(jnp.asarray(phi_NxK), jnp.asarray(w_N), jnp.float64(lam))
