"""The Gauss-Newton stage 1 on a decoder's residual stream, its linearised responses and the
operator-space influence, against autodiff of the steered losses and brute-force Jacobians."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stride_jax import methods
from stride_jax.errors import ConfigError
from stride_jax.models import transformer
from stride_jax.stride import defaults, method, newton, operators, residual, sites
from stride_jax.stride.operators import SteeringOperators

D, R = 8, 2


@pytest.fixture(scope="module")
def setup():
    """A tiny decoder (d=8) on 24 blocks of 12 characters, its stage-1 inputs, rank-2 ops."""
    from conftest import tiny_decoder_task

    _, task = tiny_decoder_task(
        block_len=12, n_train=24, n_query=3, model=dict(d_model=D, n_heads=2, n_kv_heads=1)
    )
    cfg = defaults.decoder_residual()
    cfg.stage1.update(rank=R, top_k=5, sketch_dim=4, init="newton", steps=0, lr_muon=0.0)
    cfg.stage1.subsets_per_step = 0
    cfg.stage1.update(w_fidelity=1e-2, gate_l2=1e-3, fisher_samples=1)
    cfg.design.update(num_subsets=12, degree=2)
    site = task.site(cfg)
    cache = site.encode(task.train)
    design = method.design_for(cfg.design, len(task.train), "decoder")
    inputs = site.stage1_inputs(cache, design, method._keys(cfg)[0])  # the fit's own
    fitted = method.fit(task, cfg, reuse=False)
    return task, cfg, site, design, inputs, fitted


def _ops(w_down, t, gates=None):
    """Rank-R operators on basis ``w_down`` (zero gates, or ``gates``)."""
    ops = SteeringOperators(D, D, R, t, rngs=nnx.Rngs(0))
    ops.w_down[...] = w_down
    if gates is not None:
        ops.gates[...] = gates
    return ops


def _w_down(fitted):
    return fitted.params["w_down"][...]


def _loss_grad(w_down, inputs, t, rows):
    """Autodiff reference: d/dB of operator 0's mean steered loss over ``rows`` at B = 0."""
    w = np.zeros(inputs.num_rows, np.float32)
    w[list(rows)] = 1.0
    return _grad_fn(t)(jnp.zeros((D, R)), w_down, inputs, jnp.asarray(w / w.sum())).reshape(-1)


@functools.lru_cache
def _grad_fn(t):
    def loss(g, w_down, inputs, w_N):
        ops = _ops(w_down, t, jnp.zeros((t, D, R)).at[0].set(g))
        rows = jnp.arange(inputs.num_rows)[None]
        return (inputs.steered_losses(ops, rows, jnp.array([0]), False)[0] * w_N).sum()

    return jax.jit(jax.grad(loss))


def _exact_gauss_newton(w_down, inputs, t):
    """sum over target positions of J^T F J of the steered top-K logits (brute-force
    Jacobians), divided by the row's target count, averaged over rows: the Hessian of the
    mean truncated KL at B = 0."""
    n = inputs.num_rows

    def top_logits(g, i):
        ops = _ops(w_down, t, jnp.zeros((t, D, R)).at[0].set(g.reshape(D, R)))
        h, attn, _, _, flat = inputs._steered(ops, jnp.array([[i]]), jnp.array([0]), False)
        hn = inputs.upper.normed(inputs.model_params, h, attn)
        w_vd = transformer.head_matrix(inputs.upper.graphdef, inputs.model_params).T
        return jnp.einsum("bld,blkd->blk", hn, w_vd[inputs.top_idx_NxLxK[flat]])[0]

    @jax.jit
    def row(i):
        jac = jax.jacfwd(top_logits)(jnp.zeros(D * R), i)[:-1]  # L-1 x K x P
        p = jax.nn.softmax(top_logits(jnp.zeros(D * R), i), -1)[:-1]
        fisher = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
        w = inputs.loss_mask_NxL[i][1:].astype(jnp.float32)
        return jnp.einsum("lkp,lkj,ljq,l->pq", jac, fisher, jac, w) / w.sum()

    return sum(row(i) for i in range(n)) / n


def test_row_gradients_match_autodiff(setup):
    _, _, _, design, inputs, fitted = setup
    ops = _ops(_w_down(fitted), design.num_subsets)
    grads = nnx.jit(lambda ops, i: inputs.row_gradients(ops, i))
    for i in (0, 5, 23):
        ref = _loss_grad(_w_down(fitted), inputs, design.num_subsets, [i])
        got = grads(ops, i)[0]
        np.testing.assert_allclose(got, ref, atol=1e-6 * float(jnp.abs(ref).max()) + 1e-9)


def test_sampled_fisher_converges_to_exact_gauss_newton(setup):
    _, _, _, design, inputs, fitted = setup
    ops = _ops(_w_down(fitted), design.num_subsets)
    exact = _exact_gauss_newton(_w_down(fitted), inputs, design.num_subsets)
    errors = {}
    for s in (4, 256):
        h, _ = newton.curvature_and_gradients(ops, dataclasses.replace(inputs, fisher_samples=s))
        errors[s] = float(jnp.linalg.norm(h - exact) / jnp.linalg.norm(exact))
    # Monte Carlo: the error falls like 1/sqrt(samples) (8x from 4 to 256 samples).
    assert errors[256] < 0.1 and errors[256] < errors[4] / 4, errors


def test_newton_gates_solve_the_damped_system_on_subset_gradients(setup):
    task, cfg, _, design, inputs, fitted = setup
    ops = nnx.merge(fitted.graphdef, fitted.params)
    h, _ = newton.curvature_and_gradients(ops, inputs)
    c = cfg.stage1
    damped = (c.w_fidelity + c.w_stability) * h + c.gate_l2 * jnp.eye(D * R)
    for k in (0, 7):
        members = [int(m) for m in design.members_TxS[k] if m < len(task.train)]
        g_k = _loss_grad(_w_down(fitted), inputs, design.num_subsets, members)  # mean over members
        b_k = ops.gates[...][k].reshape(-1)
        resid = damped @ b_k + c.w_fidelity * g_k
        assert float(jnp.abs(resid).max()) < 1e-4 * float(jnp.abs(c.w_fidelity * g_k).max())
        assert float(jnp.abs(b_k).max()) > 0


def test_linear_responses_are_the_forward_pass_first_order(setup):
    task, cfg, site, _, _, _ = setup
    small = cfg.copy_and_resolve_references()
    small.stage1.w_fidelity = 1e-3  # small shifts (float32 responses still well resolved)
    fitted = method.fit(task, small, reuse=False)
    cache_q = site.encode(task.query)
    neg = jax.tree_util.tree_map(lambda x: x, fitted.params)
    neg["gates"][...] = -fitted.params["gates"][...]
    plus = site.responses(fitted.graphdef, fitted.params, cache_q, task.query, None)
    minus = site.responses(fitted.graphdef, neg, cache_q, task.query, None)
    small.responses = "linear"
    lin = task.site(small).stage2_responses(
        fitted.graphdef, fitted.params, cache_q, task.query, None
    )
    assert lin.shape == plus.shape == (len(task.query), 12)
    # (y(B) - y(-B)) / 2 cancels the second-order term of the forward responses.
    first = (plus - minus) / 2
    np.testing.assert_allclose(lin, first, rtol=0, atol=0.02 * float(jnp.abs(first).max()))
    assert float(jnp.abs(plus - lin).max()) > 0.05 * float(jnp.abs(first).max())  # nonlinear


def test_opspace_is_the_damped_influence_of_each_row(setup):
    task, cfg, site, design, inputs, _ = setup
    m = methods.get("opspace", "decoder")
    fitted = m.fit(task, cfg)
    scores = m.score(task, fitted, task.query, cfg)
    ops = nnx.merge(fitted.graphdef, fitted.params)
    h, _ = newton.curvature_and_gradients(ops, inputs)
    lam = cfg.stage1.gate_l2 / (cfg.stage1.w_fidelity + cfg.stage1.w_stability)
    g_train = np.stack(
        [
            _loss_grad(_w_down(fitted), inputs, design.num_subsets, [i])
            for i in range(len(task.train))
        ]
    )
    q_inputs = site.row_inputs(site.encode(task.query), task.query)
    g_query = np.stack(
        [
            _loss_grad(_w_down(fitted), q_inputs, design.num_subsets, [i])
            for i in range(len(task.query))
        ]
    )
    ref = g_query @ np.linalg.solve(np.asarray(h) + lam * np.eye(D * R), g_train.T)
    np.testing.assert_allclose(scores, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_pca_basis_is_the_residual_tokens_principal_directions(setup):
    task, cfg, _, _, _, _ = setup
    pca = cfg.copy_and_resolve_references()
    pca.stage1.basis = "pca"
    fitted = method.fit(task, pca, reuse=False)
    cache = task.site(pca).encode(task.train)
    mask = np.asarray(task.arrays(task.train)["attn"]) > 0
    ref = operators.whitened_basis(
        np.asarray(cache["h"])[mask], R, pca.stage1.basis_scale, whiten=False
    )
    np.testing.assert_allclose(fitted.params["w_down"][...], ref, rtol=1e-5, atol=1e-6)
    assert residual.token_basis(cache["h"], mask, R, 1.0, "whitened").shape == (D, R)


def test_bad_settings_are_refused(setup):
    task, cfg, _, _, _, _ = setup
    for key, value, match in (
        ("basis", "svd", "stage1.basis must be one of"),
        ("init", "adam", "stage1.init must be one of"),
    ):
        bad = cfg.copy_and_resolve_references()
        bad.stage1[key] = value
        with pytest.raises(ConfigError, match=match):
            task.site(bad)
    bad = cfg.copy_and_resolve_references()
    bad.responses = "linearised"
    with pytest.raises(ConfigError, match="stride.responses must be one of"):
        task.site(bad)
    muon = cfg.copy_and_resolve_references()
    muon.stage1.update(basis="pca", lr_muon=0.02)
    with pytest.raises(ConfigError, match="frozen data basis"):
        task.site(muon)
    cls = defaults.classifier()
    cls.stage1.basis = "pca"
    with pytest.raises(ConfigError, match="stage1.basis selects the residual-stream basis"):
        sites.classifier_site(None, cls)


def test_default_recipe_runs_on_fewer_rows_than_the_sketch():
    """The default's automatic T = N; with N = 12 < sketch_dim = 16 the Gauss-Newton recipe
    (no Adam steps, so no sketch) still runs; the Adam recipe's check still refuses it."""
    from conftest import tiny_decoder_task

    _, task = tiny_decoder_task(block_len=12, n_train=12, n_query=2)
    cfg = defaults.decoder()
    assert cfg.stage1.sketch_dim > len(task.train)
    scores = method.score(task, method.fit(task, cfg, reuse=False), task.query, cfg)
    assert scores.shape == (2, 12) and np.isfinite(scores).all()
    adam = defaults.decoder_adam()
    adam.stage1.subsets_per_step = 0
    with pytest.raises(ConfigError, match="sketch_dim=16 must be smaller than the T subsets"):
        method.fit(task, adam, reuse=False)
