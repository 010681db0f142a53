"""The Gauss-Newton start of stage 1 against brute-force Jacobians and a plain optimizer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.optimize

from stride_jax import sharding
from stride_jax.errors import ConfigError
from stride_jax.models import mlp
from stride_jax.stride import classifier_inputs, defaults, newton, stage1, subsets
from stride_jax.stride.operators import HiddenHook, LogitHook

C = 5


def _setup(hidden_hook: bool, n=80, t=8, deg=1, top_k=3, seed=0):
    """A tiny MLP's cached rows, its stage-1 inputs and (zero-gate) operators."""
    from flax import nnx

    model = mlp.MLP(7, (6, 5), C, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, 7)).astype(np.float32))
    y = rng.integers(0, C, n).astype(np.int32)
    cfg = ml_collections.ConfigDict(
        defaults.stage1_defaults(
            sketch="gaussian",
            sketch_dim=2,
            top_k=top_k,
            rank=4,
            basis_scale=0.5,
            init="newton",
            w_fidelity=0.05,
            gate_l2=1e-3,
        )
    )
    if hidden_hook:
        hook = HiddenHook(
            lambda v: mlp.hidden_site(graphdef, params, v), mlp.head_weights(params), 3
        )
    else:
        hook = LogitHook(
            lambda v: mlp.apply_features(graphdef, params, v),
            lambda v: mlp.apply(graphdef, params, v),
        )
    cache = jax.jit(hook.encode)(x)
    design = subsets.expander(jax.random.key(seed), t, n, deg)
    inputs = classifier_inputs.make_inputs(
        cache, y, design, cfg, jax.random.key(1), fixed=hook.fixed
    )
    ops = hook.make_operators(jax.random.key(2), cache, t, cfg)
    return ops, inputs, cfg


def _sites(ops):
    return [ops.hidden, ops.logit] if hasattr(ops, "hidden") else [ops]


def _logits_fn(ops, inputs):
    """flat gates of operator 0 -> its steered logits on every training row (N x C)."""
    from flax import nnx

    rows = inputs.rows(jnp.arange(inputs.y_N.shape[0]))
    graphdef, state = nnx.split(ops)

    n_gates = [
        (jax.tree_util.keystr(p), x.size // x.shape[0], x.shape[1:])
        for p, x in jax.tree_util.tree_leaves_with_path(state)
        if "gates" in jax.tree_util.keystr(p)
    ]

    def f(flat_P):
        # Operator 0's gates from flat_P (sites in linear_sites order: hidden before logit).
        pieces, start = {}, 0
        for path, size, shape in sorted(n_gates, key=lambda e: "logit" in e[0]):
            pieces[path] = flat_P[start : start + size].reshape(shape)
            start += size

        def put(path, x):
            key = jax.tree_util.keystr(path)
            return x.at[0].set(pieces[key]) if key in pieces else x

        fresh = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(put, state))
        return fresh.steered_logits(rows, jnp.array([0]), True, inputs.fixed)[0]

    return f


def _num_params(ops):
    return sum(s.gates[...][0].size for s in _sites(ops))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("hidden_hook", [False, True])
def test_curvature_and_gradients_match_brute_force_jacobians(hidden_hook):
    """H = mean_n J_n^T M_n J_n (M the top-K renormalised softmax's covariance, J from
    jax.jacfwd of the steered logits) and g_k = mean over S_k of J_n^T (softmax - onehot),
    computed one row at a time in float64 numpy."""
    ops, inputs, cfg = _setup(hidden_hook)
    h, per_example_g = jax.jit(lambda: newton.curvature_and_gradients(ops, inputs, chunk=32))()
    g = newton._aggregate(per_example_g, inputs)
    n, p = inputs.y_N.shape[0], _num_params(ops)
    jac_NxCxP = np.asarray(jax.jacfwd(_logits_fn(ops, inputs))(jnp.zeros(p)), np.float64)
    z = np.asarray(inputs.logits_NxC, np.float64)
    y = np.asarray(inputs.y_N)
    h_ref = np.zeros((p, p))
    per_example = np.zeros((n, p))
    for i in range(n):
        top = np.argsort(-z[i])[: cfg.top_k]
        q = _softmax(z[i, top])
        m = np.zeros((C, C))
        m[np.ix_(top, top)] = np.diag(q) - np.outer(q, q)
        h_ref += jac_NxCxP[i].T @ m @ jac_NxCxP[i] / n
        resid = _softmax(z[i])
        resid[y[i]] -= 1.0
        per_example[i] = jac_NxCxP[i].T @ resid
    members = np.asarray(inputs.members_TxS)
    g_ref = np.stack([per_example[row[row < n]].mean(0) for row in members])
    np.testing.assert_allclose(np.asarray(h), h_ref, rtol=1e-4, atol=1e-6 * np.abs(h_ref).max())
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-4, atol=1e-6 * np.abs(g_ref).max())
    np.testing.assert_allclose(
        np.asarray(per_example_g), per_example, rtol=1e-4, atol=1e-6 * np.abs(per_example).max()
    )


def _objective(ops, inputs, cfg, k):
    """Operator k's stage-1 objective without linearity (w_f fidelity on its members + w_s
    truncated KL on the non-members + gate_l2 ||B||^2 / 2), float64 via jax.grad."""
    f = _logits_fn(ops, inputs)
    n = inputs.y_N.shape[0]
    member = np.zeros(n, bool)
    row = np.asarray(inputs.members_TxS[k])
    member[row[row < n]] = True
    y = inputs.y_N
    idx, logp = inputs.top_idx_NxK, inputs.top_logp_NxK

    def loss(flat):
        z = f(flat)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], 1)[:, 0]
        logq = jax.nn.log_softmax(jnp.take_along_axis(z, idx, 1))
        kl = (jnp.exp(logp) * (logp - logq)).sum(-1)
        fid = ce[member].mean()
        stab = kl[~member].mean()
        return cfg.w_fidelity * fid + cfg.w_stability * stab + 0.5 * cfg.gate_l2 * (flat**2).sum()

    vg = jax.jit(jax.value_and_grad(loss))
    return lambda x: tuple(np.asarray(v, np.float64) for v in vg(jnp.asarray(x, jnp.float32)))


@pytest.mark.parametrize("hidden_hook", [False, True])
def test_newton_gates_are_near_the_minimiser_of_the_stage1_objective(hidden_hook):
    """With a small fidelity weight the one-step gates sit close to what L-BFGS finds on each
    operator's real (nonlinear) objective: the claim that justifies the start."""
    ops, inputs, cfg = _setup(hidden_hook, n=160)
    cfg.w_fidelity = 0.01  # the library default: small steps, where the objective is ~quadratic
    gates = jax.jit(lambda: newton.newton_gates(ops, inputs, cfg))()
    for k in range(3):
        ours = np.concatenate([np.asarray(g[k]).ravel() for g in gates])
        fun = _objective(ops, inputs, cfg, k)
        best = scipy.optimize.minimize(
            fun, np.zeros_like(ours), jac=True, method="L-BFGS-B", options={"gtol": 1e-10}
        ).x
        cos = ours @ best / (np.linalg.norm(ours) * np.linalg.norm(best))
        assert cos > 0.97, (k, cos)
        assert np.linalg.norm(ours - best) < 0.25 * np.linalg.norm(best)
        # ...and much closer than the zero gates a plain start begins from.
        assert fun(ours)[0] < fun(np.zeros_like(ours))[0]


def test_fit_with_newton_start_and_no_steps_returns_the_newton_gates():
    ops, inputs, cfg = _setup(True)
    cfg.steps = 0
    want = jax.jit(lambda: newton.newton_gates(ops, inputs, cfg))()
    hook_ops = lambda key: ops  # noqa: E731 - the operators built above, gates still zero
    _, params, history = stage1.fit_operators(
        inputs, cfg, jax.random.key(0), sharding.make_mesh(), make_ops=hook_ops
    )
    assert history == []
    np.testing.assert_allclose(params["hidden"]["gates"][...], want[0], rtol=1e-6)
    np.testing.assert_allclose(params["logit"]["gates"][...], want[1], rtol=1e-6)
    assert np.abs(np.asarray(want[0])).max() > 0


def test_bad_newton_settings_are_refused():
    ops, inputs, cfg = _setup(False)
    cfg.init = "newtn"
    with pytest.raises(ConfigError, match="stage1.init"):
        newton.initialise(ops, inputs, cfg)
    cfg.update(init="newton", w_fidelity=0.0)
    with pytest.raises(ConfigError, match="w_fidelity"):
        newton.initialise(ops, inputs, cfg)
    cfg.w_fidelity = 0.05
    with pytest.raises(ConfigError, match="linear sites"):
        newton.initialise(object(), inputs, cfg)


def test_steps_zero_needs_the_newton_start(tiny):
    from stride_jax.job.config import validate

    tiny.stride.stage1.update(steps=0, init="zero")
    with pytest.raises(ConfigError, match="stage1.steps"):
        validate(tiny)
    tiny.stride.stage1.init = "newton"
    validate(tiny)
    tiny.stride.stage1.init = "gauss"
    with pytest.raises(ConfigError, match="stage1.init"):
        validate(tiny)


@pytest.mark.parametrize("hidden_hook", [False, True])
def test_subset_gradients_streamed_equal_the_per_example_ones(hidden_hook, monkeypatch):
    """Above _MAX_G_BYTES of N x P gradients the subset means are summed as rows stream (no
    N x P array, and the chunks here do not divide N): the same Newton gates."""
    ops, inputs, cfg = _setup(hidden_hook, n=90, t=12, deg=3)
    want = jax.jit(lambda: newton.newton_gates(ops, inputs, cfg))()
    monkeypatch.setattr(newton, "_MAX_G_BYTES", 0)
    monkeypatch.setattr(newton.curvature_and_gradients, "__defaults__", (32, False))
    got = jax.jit(lambda: newton.newton_gates(ops, inputs, cfg))()
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t", [8, 60])
def test_newton_gates_solve_each_subset_like_a_dense_solve(t):
    """T <= N solves the T subset gradients, T > N the N per-example ones and averages: both
    equal numpy's dense solve of ((w_f + w_s) H + gate_l2 I) b_k = -w_f g_k per subset."""
    ops, inputs, cfg = _setup(True, n=40, t=t, deg=5)
    h, per_example = jax.jit(lambda: newton.curvature_and_gradients(ops, inputs))()
    gates = jax.jit(lambda: newton.newton_gates(ops, inputs, cfg))()
    ours = np.concatenate([np.asarray(g).reshape(t, -1) for g in gates], axis=1)
    h = np.asarray(h, np.float64)
    damped = (cfg.w_fidelity + cfg.w_stability) * h + cfg.gate_l2 * np.eye(h.shape[0])
    n = inputs.y_N.shape[0]
    for k, row in enumerate(np.asarray(inputs.members_TxS)):
        g_k = np.asarray(per_example, np.float64)[row[row < n]].mean(0)
        want = -cfg.w_fidelity * np.linalg.solve(damped, g_k)
        np.testing.assert_allclose(ours[k], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_resume_restores_without_recomputing_the_newton_step(tmp_path, monkeypatch):
    """A finished run's checkpoint replaces the start, so a rerun never solves the step
    again, and it returns the same operators."""
    ops, inputs, cfg = _setup(False)
    cfg.update(steps=10, log_every=10, ckpt_every=10, warmup_steps=1)
    mesh, workdir = sharding.make_mesh(), str(tmp_path)
    first = stage1.fit_operators(
        inputs, cfg, jax.random.key(0), mesh, workdir, make_ops=lambda key: ops
    )[1]

    def refuse(*_):
        raise AssertionError("the Newton step ran although a checkpoint was restored")

    monkeypatch.setattr(newton, "initialise", refuse)
    fresh, _, _ = _setup(False)
    again = stage1.fit_operators(
        inputs, cfg, jax.random.key(0), mesh, workdir, make_ops=lambda key: fresh
    )[1]
    np.testing.assert_array_equal(again["gates"][...], first["gates"][...])
