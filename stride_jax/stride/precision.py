"""The compute dtype of STRIDE's responses (``stride.compute_dtype``): "float32" (default) or
"bfloat16".

What runs in bfloat16 (stage 2, all T operators on every query: the hot path): the steering
operators' products, LN(h) W_down and B_k phi (``operators.with_compute_dtype``), as three
bfloat16 products accumulated in float32 (``_split``), and for decoders the linear layers of
the blocks above the hook, one bfloat16 product each with float32 accumulation
(``transformer.with_compute_dtype``, ``residual.Upper``).

What stays float32, and why:
- the residual stream, norms, attention scores and softmax, the vocabulary head, logits,
  log-softmax and cross-entropy: sums of many terms, and a response is a difference of two
  cross-entropies (``responses.ce_drop`` exists to avoid that cancellation);
- stage 1 (Adam and Gauss-Newton): Adam normalises each gradient coordinate, so a rounding
  change in a near-zero coordinate becomes a full step; on the tiny classifier a 1e-5
  relative change of the operators' products in stage 1 moved the scores to Spearman 0.978
  against float32. The Gauss-Newton curvature and its Cholesky solve are ill-conditioned sums;
- the base model's encode (once per row), the Lasso and everything after the responses.
"float32" runs exactly the float32 code: results are bit-identical to a config without the
key. The agreement of the two is tested in tests/test_precision.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stride_jax.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(cfg) -> str:
    """``cfg.compute_dtype`` of a ``stride`` config ("float32" when absent), checked."""
    name = cfg.get("compute_dtype", "float32")
    check(name)
    return name


def check(name: str) -> None:
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"stride.compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")


def matmul(a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    """``a @ b``; in bfloat16 as three bfloat16 products accumulated in float32 (``_split``)."""
    if dtype == "float32":
        return a @ b
    return _split(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32), a, b)


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` with ``matmul``'s precision rule."""
    if dtype == "float32":
        return jnp.einsum(spec, a, b)
    return _split(lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32), a, b)


def _split(product, a: jax.Array, b: jax.Array) -> jax.Array:
    """``product(a, b)`` (bilinear) from bfloat16 operands: each float32 operand is split
    into a bfloat16 head and the bfloat16 rounding of its remainder, and
    ``hi_a hi_b + hi_a lo_b + lo_a hi_b`` accumulates in float32 (XLA's BF16_BF16_F32_X3).
    Its relative error is ~1e-5, where one bfloat16 product's is ~3e-3: the operators'
    outputs are small loss drops that the Lasso turns into sparse supports, and a 3e-3 error
    there moved the tiny configs' score ranks below Spearman 0.99 (tests/test_precision.py).
    The gradient is exact: the remainder's derivative is zero."""
    low = jnp.bfloat16
    a_hi, b_hi = a.astype(low), b.astype(low)
    a_lo = (a - a_hi.astype(a.dtype)).astype(low)
    b_lo = (b - b_hi.astype(b.dtype)).astype(low)
    return (product(a_lo, b_hi) + product(a_hi, b_lo)) + product(a_hi, b_hi)
