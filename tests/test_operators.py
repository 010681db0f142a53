"""Steering operators and the logit hook, against plain-numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stride_jax.stride.operators import LogitHook, SteeringOperators, layer_norm_noaffine

D, OUT, R, T, B = 12, 5, 4, 7, 6


def np_layer_norm(h, eps=1e-5):
    h = np.asarray(h, np.float64)
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + eps)


def np_silu(z):
    return z / (1.0 + np.exp(-z))


@pytest.fixture
def ops():
    return SteeringOperators(D, OUT, R, T, rngs=nnx.Rngs(0))


def set_random_gates(ops, seed=1):
    gates = np.random.default_rng(seed).normal(size=(T, OUT, R)).astype(np.float32)
    ops.gates[...] = jnp.asarray(gates)
    return gates


def test_param_shapes_and_zero_init(ops):
    assert ops.w_down[...].shape == (D, R)
    assert ops.gates[...].shape == (T, OUT, R)
    assert ops.w_down[...].dtype == jnp.float32
    assert np.all(np.asarray(ops.gates[...]) == 0.0)
    assert np.any(np.asarray(ops.w_down[...]) != 0.0)  # basis itself is not trivial


def test_init_depends_on_rngs():
    a = SteeringOperators(D, OUT, R, T, rngs=nnx.Rngs(0))
    a2 = SteeringOperators(D, OUT, R, T, rngs=nnx.Rngs(0))
    b = SteeringOperators(D, OUT, R, T, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(a.w_down[...], a2.w_down[...])
    assert not np.allclose(a.w_down[...], b.w_down[...])


def test_zero_init_is_base_model(ops):
    rng = np.random.default_rng(0)
    w_feat = rng.normal(size=(9, D)).astype(np.float32)
    w_out = rng.normal(size=(D, OUT)).astype(np.float32)
    hook = LogitHook(
        features_fn=lambda x: jnp.tanh(x @ w_feat), logits_fn=lambda x: jnp.tanh(x @ w_feat) @ w_out
    )
    x = jnp.asarray(rng.normal(size=(B, 9)).astype(np.float32))
    cache = hook.encode(x)
    np.testing.assert_allclose(cache["h"], np.tanh(np.asarray(x) @ w_feat), rtol=1e-5, atol=1e-6)
    phi = ops.basis(cache["h"])
    shifts = ops.shifts(phi)
    assert shifts.shape == (T, B, OUT)
    assert np.all(np.asarray(shifts) == 0.0)
    steered = LogitHook.steered_logits(cache, shifts)
    assert steered.shape == (T, B, OUT)
    for k in range(T):
        np.testing.assert_array_equal(steered[k], cache["logits"])
    sub = ops.shifts(phi, jnp.array([3, 0]))
    assert sub.shape == (2, B, OUT) and np.all(np.asarray(sub) == 0.0)


def test_layer_norm_matches_numpy():
    h = np.random.default_rng(2).normal(3.0, 2.5, size=(B, D)).astype(np.float32)
    np.testing.assert_allclose(layer_norm_noaffine(jnp.asarray(h)), np_layer_norm(h), atol=1e-5)
    # Constant rows: variance 0, eps keeps it finite and the output is exactly 0.
    const = jnp.full((2, D), 4.0)
    np.testing.assert_allclose(layer_norm_noaffine(const), np.zeros((2, D)), atol=1e-6)


def test_basis_matches_numpy(ops):
    h = np.random.default_rng(3).normal(1.0, 4.0, size=(B, D)).astype(np.float32)
    w = np.asarray(ops.w_down[...], np.float64)
    expected = np_silu(np_layer_norm(h) @ w)
    got = ops.basis(jnp.asarray(h))
    assert got.shape == (B, R)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_basis_is_shift_and_scale_invariant(ops):
    """LN without affine: phi(a h + c) == phi(h) for a > 0 (up to eps)."""
    h = np.random.default_rng(4).normal(size=(B, D)).astype(np.float32)
    np.testing.assert_allclose(
        ops.basis(jnp.asarray(3.0 * h + 2.0)), ops.basis(jnp.asarray(h)), rtol=1e-4, atol=1e-4
    )


def test_shifts_match_loop(ops):
    gates = set_random_gates(ops)
    phi = np.random.default_rng(5).normal(size=(B, R)).astype(np.float32)

    got_all = np.asarray(ops.shifts(jnp.asarray(phi)))
    ref_all = np.zeros((T, B, OUT))
    for k in range(T):
        for b in range(B):
            ref_all[k, b] = gates[k].astype(np.float64) @ phi[b]
    np.testing.assert_allclose(got_all, ref_all, rtol=1e-5, atol=1e-5)

    ids = np.array([4, 0, 4, 6])  # repeated ids allowed
    got = np.asarray(ops.shifts(jnp.asarray(phi), jnp.asarray(ids)))
    assert got.shape == (len(ids), B, OUT)
    for j, k in enumerate(ids):
        for b in range(B):
            np.testing.assert_allclose(got[j, b], gates[k] @ phi[b], rtol=1e-5, atol=1e-5)


def test_shifts_per_row_match_loop(ops):
    gates = set_random_gates(ops, seed=6)
    ids = np.array([2, 5, 2])
    phi = np.random.default_rng(7).normal(size=(len(ids), B, R)).astype(np.float32)
    got = np.asarray(ops.shifts_per_row(jnp.asarray(phi), jnp.asarray(ids)))
    assert got.shape == (len(ids), B, OUT)
    for j, k in enumerate(ids):
        for b in range(B):
            np.testing.assert_allclose(got[j, b], gates[k] @ phi[j, b], rtol=1e-5, atol=1e-5)
    # Same phi in every row reduces to shifts().
    same = np.broadcast_to(phi[0], phi.shape)
    np.testing.assert_allclose(
        ops.shifts_per_row(jnp.asarray(same), jnp.asarray(ids)),
        ops.shifts(jnp.asarray(phi[0]), jnp.asarray(ids)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_steered_logits_adds_shift(ops):
    gates = set_random_gates(ops, seed=8)
    rng = np.random.default_rng(9)
    h = rng.normal(size=(B, D)).astype(np.float32)
    logits = rng.normal(size=(B, OUT)).astype(np.float32)
    cache = {"h": jnp.asarray(h), "logits": jnp.asarray(logits)}
    steered = np.asarray(LogitHook.steered_logits(cache, ops.shifts(ops.basis(cache["h"]))))
    phi = np_silu(np_layer_norm(h) @ np.asarray(ops.w_down[...], np.float64))
    for k in range(T):
        np.testing.assert_allclose(steered[k], logits + phi @ gates[k].T, rtol=1e-4, atol=1e-4)


def test_gradients_flow_to_gates_and_basis(ops):
    """With zero gates, w_down gets no gradient but the gates do (the usual zero-init LoRA)."""
    h = jnp.asarray(np.random.default_rng(10).normal(size=(B, D)).astype(np.float32))

    def loss(model):
        return (model.shifts(model.basis(h)) ** 2 + model.shifts(model.basis(h))).sum()

    grads = nnx.grad(loss)(ops)
    g_gates = np.asarray(grads.gates[...])
    assert np.abs(g_gates).max() > 0
    np.testing.assert_array_equal(np.asarray(grads.w_down[...]), 0.0)
    # d/dB_k of sum(B_k phi_b) = sum_b 1 phi_b^T (square term vanishes at B = 0).
    phi = np.asarray(ops.basis(h))
    for k in range(T):
        np.testing.assert_allclose(g_gates[k], np.ones((OUT, 1)) * phi.sum(0), rtol=1e-5, atol=1e-5)


def _tiny_mlp(in_dim=9, hidden=(8, 6), classes=OUT):
    from stride_jax.models import mlp

    model = mlp.MLP(in_dim, hidden, classes, rngs=nnx.Rngs(3))
    return nnx.split(model, nnx.Param)


def _np_gelu(x):  # the tanh approximation, as jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_hidden_site_cache_matches_the_model():
    from stride_jax.models import mlp

    graphdef, params = _tiny_mlp()
    x = jnp.asarray(np.random.default_rng(11).normal(size=(B, 9)).astype(np.float32))
    cache = mlp.hidden_site(graphdef, params, x)
    np.testing.assert_allclose(cache["logits"], mlp.apply(graphdef, params, x), atol=1e-5)
    np.testing.assert_allclose(cache["h"], mlp.apply_features(graphdef, params, x), atol=1e-6)
    w1 = np.asarray(params["layers"][1]["kernel"][...])
    b1 = np.asarray(params["layers"][1]["bias"][...])
    np.testing.assert_allclose(cache["a"], np.asarray(cache["u"]) @ w1 + b1, atol=1e-5)


def test_hidden_site_operators_match_a_loop_over_a_modified_network():
    """Steered logits == the MLP run with its last hidden pre-activation shifted by U_k psi(u),
    plus B_k phi(h) on the logits (numpy forward pass, one operator at a time)."""
    from stride_jax.models import mlp
    from stride_jax.stride.operators import HiddenHook

    graphdef, params = _tiny_mlp()
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(B, 9)).astype(np.float32))
    hook = HiddenHook(lambda v: mlp.hidden_site(graphdef, params, v), mlp.head_weights(params), 4)
    cache = hook.encode(x)
    cfg = type("C", (), {"rank": 3, "basis_scale": 0.5})()
    big = mlp.hidden_site(graphdef, params, jnp.asarray(rng.normal(size=(50, 9)), jnp.float32))
    ops = hook.make_operators(jax.random.key(0), big, T, cfg)
    zero = np.asarray(ops.steered_logits(cache, None, True, hook.fixed))
    np.testing.assert_array_equal(zero, np.broadcast_to(cache["logits"], zero.shape))
    u_gates = rng.normal(size=(T, 6, 4)).astype(np.float32)
    b_gates = rng.normal(size=(T, OUT, 3)).astype(np.float32)
    ops.hidden.gates[...] = jnp.asarray(u_gates)
    ops.logit.gates[...] = jnp.asarray(b_gates)
    got = np.asarray(ops.steered_logits(cache, None, True, hook.fixed))
    u, h = np.asarray(cache["u"], np.float64), np.asarray(cache["h"], np.float64)
    psi = np_silu(np_layer_norm(u) @ np.asarray(ops.hidden.w_down[...], np.float64))
    phi = np_silu(np_layer_norm(h) @ np.asarray(ops.logit.w_down[...], np.float64))
    w1, b1 = (np.asarray(params["layers"][1][k][...], np.float64) for k in ("kernel", "bias"))
    w2, b2 = (np.asarray(params["head"][k][...], np.float64) for k in ("kernel", "bias"))
    for k in range(T):
        hidden = _np_gelu(u @ w1 + b1 + psi @ u_gates[k].T)
        want = hidden @ w2 + b2 + phi @ b_gates[k].T
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-4)
    # Precomputed basis features (what stage 1 gathers with a frozen basis) give the same.
    with_basis = {"a": cache["a"], "logits": cache["logits"]} | ops.basis_rows(cache)
    np.testing.assert_allclose(
        ops.steered_logits(with_basis, None, True, hook.fixed), got, rtol=1e-6, atol=1e-6
    )
    per_row = ops.steered_logits(
        {k: jnp.broadcast_to(v, (2, *v.shape)) for k, v in cache.items()},
        jnp.array([5, 1]),
        False,
        hook.fixed,
    )
    np.testing.assert_allclose(per_row, got[[5, 1]], rtol=1e-5, atol=1e-5)
    assert float(ops.gate_sq_norms()[2]) == pytest.approx(
        float((u_gates[2] ** 2).sum() + (b_gates[2] ** 2).sum()), rel=1e-5
    )


def test_whitened_basis_gives_decorrelated_features_of_the_chosen_scale():
    from stride_jax.errors import ConfigError
    from stride_jax.stride.operators import whitened_basis

    rng = np.random.default_rng(13)
    u = rng.normal(size=(400, 10)) @ rng.normal(size=(10, 10)) + 3.0
    w = np.asarray(whitened_basis(jnp.asarray(u, jnp.float32), 6, 0.1), np.float64)
    feats = np_layer_norm(u) @ w
    np.testing.assert_allclose(np.cov(feats.T), 0.01 * np.eye(6), atol=2e-4)
    # the leading directions: projecting LN(u) on them keeps more variance than any others
    ln = np_layer_norm(u) - np_layer_norm(u).mean(0)
    evals = np.sort(np.linalg.eigvalsh(np.cov(ln.T)))[::-1]
    q, _ = np.linalg.qr(w)
    np.testing.assert_allclose(np.trace(q.T @ np.cov(ln.T) @ q), evals[:6].sum(), rtol=1e-4)
    with pytest.raises(ConfigError, match="exceeds"):
        whitened_basis(jnp.asarray(u, jnp.float32), 11, 0.1)
