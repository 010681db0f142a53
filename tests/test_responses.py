"""The fused all-operator response call equals a plain Python loop over operators."""

import jax
import numpy as np
from flax import nnx
from scipy.special import log_softmax

from stride_jax import sharding
from stride_jax.stride import responses
from stride_jax.stride.operators import SteeringOperators


def _random_operators(t, d, c, r, seed=0):
    ops = SteeringOperators(d, c, r, t, rngs=nnx.Rngs(seed))
    ops.gates[...] = jax.random.normal(jax.random.key(seed + 1), (t, c, r))
    return nnx.split(ops, nnx.Param)


def test_fused_responses_equal_python_loop():
    t, d, c, r, q = 13, 6, 4, 3, 11
    graphdef, params = _random_operators(t, d, c, r)
    rng = np.random.default_rng(0)
    h = rng.normal(size=(q, d)).astype(np.float32)
    z = rng.normal(size=(q, c)).astype(np.float32)
    y = rng.integers(0, c, size=q).astype(np.int32)
    fused = np.asarray(
        responses.response_matrix(
            graphdef, params, {"h": h, "logits": z}, y, sharding.make_mesh(), batch_size=4
        )
    )
    w_down = np.asarray(params["w_down"][...])
    gates = np.asarray(params["gates"][...])
    ln = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    pre = ln @ w_down
    phi = pre / (1 + np.exp(-pre))
    expected = np.zeros((q, t))
    for qi in range(q):
        ce_base = -log_softmax(z[qi])[y[qi]]
        for k in range(t):
            steered = z[qi] + gates[k] @ phi[qi]
            expected[qi, k] = ce_base + log_softmax(steered)[y[qi]]
    assert fused.shape == (q, t)
    np.testing.assert_allclose(fused, expected, atol=2e-5)


def test_zero_gates_give_zero_responses():
    graphdef, params = nnx.split(SteeringOperators(5, 3, 2, 7, rngs=nnx.Rngs(0)), nnx.Param)
    h = np.ones((4, 5), np.float32) * np.arange(5)
    out = responses.response_matrix(
        graphdef,
        params,
        {"h": h, "logits": np.zeros((4, 3))},
        np.zeros(4, np.int32),
        sharding.make_mesh(),
    )
    np.testing.assert_array_equal(np.asarray(out), 0.0)
