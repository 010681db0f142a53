"""Stage 1: the optimizer split, learning progress, and exact resume after interruption."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from stride_jax import checkpoint, sharding
from stride_jax.stride import classifier_inputs, stage1, subsets
from stride_jax.stride.operators import SteeringOperators


def _inputs(n=60, d=10, c=4, t=20, deg=3, sketch=4, seed=0, top_k=5):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)).astype(np.float32)
    logits = rng.normal(size=(n, c)).astype(np.float32)
    y = rng.integers(0, c, n).astype(np.int32)
    design = subsets.expander(jax.random.key(seed), t, n, deg)
    cfg = ml_collections.ConfigDict(dict(sketch="gaussian", sketch_dim=sketch, top_k=top_k))
    return classifier_inputs.make_inputs(
        {"h": h, "logits": logits}, y, design, cfg, jax.random.key(1)
    )


def _params_np(params):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_sketch_is_design_times_projection(tiny):
    inputs = _inputs()
    n = inputs.h_NxD.shape[0]
    proj = jax.random.normal(jax.random.key(1), (n, 4)) / np.sqrt(4)
    dense = np.zeros((inputs.members_TxS.shape[0], n + 1))
    np.put_along_axis(dense, np.asarray(inputs.members_TxS), 1.0, axis=1)
    np.testing.assert_allclose(
        np.asarray(inputs.sketch_TxM), dense[:, :n] @ np.asarray(proj), atol=1e-5
    )


def test_muon_on_basis_adamw_on_gates(tiny):
    """w_down's update is orthogonalised (flat singular values); gates' is Adam's sign-like."""
    cfg = tiny.stride.stage1
    cfg.lr_muon = 0.02
    tx = stage1.make_optimizer(cfg)
    ops = SteeringOperators(32, 4, 8, 6, rngs=nnx.Rngs(0))
    params = nnx.split(ops, nnx.Param)[1]
    state = tx.init(params)
    grads = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params
    )
    for _ in range(cfg.warmup_steps + 1):  # step past the warmup's zero learning rate
        updates, state = tx.update(grads, state, params)
    sv = np.linalg.svd(np.asarray(updates["w_down"][...]), compute_uv=False)
    raw_sv = np.linalg.svd(np.asarray(grads["w_down"][...]), compute_uv=False)
    assert sv.max() / sv.min() < 2.0 < raw_sv.max() / raw_sv.min()
    g, u = np.asarray(grads["gates"][...]), np.asarray(updates["gates"][...])
    assert np.all(np.sign(u[np.abs(g) > 1e-3]) == -np.sign(g[np.abs(g) > 1e-3]))


def test_lr_muon_zero_freezes_the_basis(tiny):
    """With lr_muon = 0 the basis after 40 steps is the one after 10 (its init); gates move."""
    cfg = tiny.stride.stage1
    out = {}
    for lr_muon, steps in ((0.0, 10), (0.0, 40), (0.02, 40)):
        cfg.update(lr_muon=lr_muon, steps=steps, warmup_steps=2)
        out[lr_muon, steps] = stage1.fit_operators(
            _inputs(), cfg, jax.random.key(0), sharding.make_mesh()
        )[1]
    w = {k: np.asarray(v["w_down"][...]) for k, v in out.items()}
    np.testing.assert_array_equal(w[0.0, 10], w[0.0, 40])
    assert np.abs(w[0.02, 40] - w[0.0, 40]).max() > 1e-3
    g10, g40 = (np.asarray(out[0.0, s]["gates"][...]) for s in (10, 40))
    assert np.abs(g40 - g10).max() > 1e-4


def test_frozen_basis_rows_give_the_same_losses_and_gate_gradients(tiny):
    """Stage 1 with lr_muon = 0 gathers precomputed basis features: same loss terms and gate
    gradients as recomputing the basis per row (which also differentiates w_down)."""
    cfg = tiny.stride.stage1
    inputs = _inputs()
    ops = SteeringOperators(10, 4, 8, 20, rngs=nnx.Rngs(0))
    ops.gates[...] = 0.3 * jax.random.normal(jax.random.key(2), ops.gates[...].shape)
    graphdef, params = nnx.split(ops, nnx.Param)
    cached = inputs.with_frozen_basis(ops)
    assert cached.extra_rows["phi"].shape == (60, 8)
    batch = stage1.sample_batch(jax.random.key(3), inputs, cfg)

    def grad_fn(inp):
        def objective(p):
            terms = stage1.loss_terms(nnx.merge(graphdef, p), inp, batch, cfg)
            return stage1.total_loss(terms, cfg), terms

        return jax.jit(jax.value_and_grad(objective, has_aux=True))

    (v0, t0), g0 = grad_fn(inputs)(params)
    (v1, t1), g1 = grad_fn(cached)(params)
    assert float(v0) > 0 and abs(float(v1) - float(v0)) <= 1e-6 * abs(float(v0))
    for k in t0:
        np.testing.assert_allclose(t1[k], t0[k], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g1["gates"][...], g0["gates"][...], rtol=1e-4, atol=1e-7)
    assert np.abs(np.asarray(g0["w_down"][...])).max() > 0
    np.testing.assert_array_equal(g1["w_down"][...], 0.0)


@pytest.mark.parametrize("fidelity_rows", ["all", "sample"])
@pytest.mark.parametrize("stability_rows", ["shared", "per_subset"])
def test_sampled_rows_match_the_design(tiny, fidelity_rows, stability_rows):
    """Against a plain loop over subsets: "all" fidelity rows are exactly each subset's
    members; stability weights are 0 exactly on members; "shared" rows are one draw."""
    cfg = tiny.stride.stage1
    cfg.update(fidelity_rows=fidelity_rows, stability_rows=stability_rows, subsets_per_step=0)
    inputs = _inputs()
    n, t = inputs.h_NxD.shape[0], inputs.members_TxS.shape[0]
    ids, mem, w_fid, non, w_stab, _ = stage1.sample_batch(jax.random.key(3), inputs, cfg)
    members = [set(int(i) for i in row if i < n) for row in np.asarray(inputs.members_TxS)]
    assert list(np.asarray(ids)) == list(range(t))
    for k in range(t):
        pairs = zip(np.asarray(mem[k]), np.asarray(w_fid[k]), strict=True)
        got = set(int(i) for i, w in pairs if w)
        if fidelity_rows == "all":
            assert got == members[k] and int(np.asarray(w_fid[k]).sum()) == len(members[k])
        else:
            assert got <= members[k]
        for row, w in zip(np.asarray(non[k]), np.asarray(w_stab[k]), strict=True):
            assert w == (0.0 if int(row) in members[k] else 1.0)
    if stability_rows == "shared":
        assert (np.asarray(non) == np.asarray(non[0])).all()
    else:
        assert not (np.asarray(non) == np.asarray(non[0])).all()


def test_shared_stability_loss_matches_a_loop(tiny):
    """loss_terms with all subsets and shared rows equals a numpy loop over operators."""
    cfg = tiny.stride.stage1
    cfg.update(w_linearity=0.0, top_k=3)
    inputs = _inputs(top_k=3)
    ops = SteeringOperators(10, 4, 8, 20, rngs=nnx.Rngs(0))
    ops.gates[...] = 0.3 * jax.random.normal(jax.random.key(5), ops.gates[...].shape)
    batch = stage1.sample_batch(jax.random.key(4), inputs, cfg)
    terms = stage1.loss_terms(ops, inputs, batch, cfg)
    ids, mem, w_fid, non, w_stab, _ = (np.asarray(b) for b in batch)
    h, z, y = (np.asarray(a, np.float64) for a in (inputs.h_NxD, inputs.logits_NxC, inputs.y_N))
    gates, w_down = np.asarray(ops.gates[...], np.float64), np.asarray(ops.w_down[...])

    def basis(rows):
        hh = h[rows]
        ln = (hh - hh.mean(-1, keepdims=True)) / np.sqrt(hh.var(-1, keepdims=True) + 1e-5)
        u = ln @ w_down
        return u / (1 + np.exp(-u))

    def log_softmax(v):
        v = v - v.max(-1, keepdims=True)
        return v - np.log(np.exp(v).sum(-1, keepdims=True))

    fid, stab = [], []
    for k in ids:
        logits = z[mem[k]] + basis(mem[k]) @ gates[k].T
        ce = -log_softmax(logits)[np.arange(len(mem[k])), y[mem[k]].astype(int)]
        fid.append((ce * w_fid[k]).sum() / w_fid[k].sum())
        steered = z[non[k]] + basis(non[k]) @ gates[k].T
        top = np.argsort(-z[non[k]], -1)[:, :3]
        logp = log_softmax(np.take_along_axis(z[non[k]], top, -1))
        logq = log_softmax(np.take_along_axis(steered, top, -1))
        kl = (np.exp(logp) * (logp - logq)).sum(-1)
        stab.append((kl * w_stab[k]).sum() / w_stab[k].sum())
    np.testing.assert_allclose(float(terms["fidelity"]), np.mean(fid), rtol=1e-5)
    np.testing.assert_allclose(float(terms["stability"]), np.mean(stab), rtol=1e-4)
    np.testing.assert_allclose(
        float(terms["gate_l2"]), 0.5 * (gates**2).sum((1, 2)).mean(), rtol=1e-5
    )


def test_stage1_lowers_fidelity_and_stays_stable(tiny):
    cfg = tiny.stride.stage1
    cfg.update(steps=100, log_every=10, w_fidelity=1.0, basis_scale=1.0)
    _, params, hist = stage1.fit_operators(_inputs(), cfg, jax.random.key(0), sharding.make_mesh())
    assert hist[-1]["fidelity"] < 0.8 * hist[0]["fidelity"]
    assert hist[-1]["stability"] < 0.5
    assert float(jnp.abs(params["gates"][...]).max()) > 0


def test_resume_after_interruption_is_exact(tiny, tmp_path, monkeypatch):
    cfg = tiny.stride.stage1
    inputs, mesh, key = _inputs(), sharding.make_mesh(), jax.random.key(0)
    _, straight, _ = stage1.fit_operators(inputs, cfg, key, mesh, str(tmp_path / "a"))

    original = checkpoint.TrainCheckpoints.save

    def save_then_die(self, step, state):
        original(self, step, state)
        raise KeyboardInterrupt(f"killed after step {step}")

    monkeypatch.setattr(checkpoint.TrainCheckpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt, match="step 20"):
        stage1.fit_operators(inputs, cfg, key, mesh, str(tmp_path / "b"))
    monkeypatch.setattr(checkpoint.TrainCheckpoints, "save", original)
    _, resumed, hist = stage1.fit_operators(inputs, cfg, key, mesh, str(tmp_path / "b"))
    assert hist[0]["step"] == 30  # picked up after the step-20 checkpoint
    for a, b in zip(_params_np(straight), _params_np(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mismatched_checkpoint_is_refused(tiny, tmp_path):
    cfg = tiny.stride.stage1
    mesh = sharding.make_mesh()
    stage1.fit_operators(_inputs(t=20), cfg, jax.random.key(0), mesh, str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        stage1.fit_operators(_inputs(t=24), cfg, jax.random.key(0), mesh, str(tmp_path))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"subsets_per_step": 50}, "exceeds T"),
        ({"subsets_per_step": -1}, "0..T"),
        ({"fidelity_rows": "some"}, "fidelity_rows"),
        ({"stability_rows": "mine"}, "stability_rows"),
        ({"gate_l2": -1.0}, "gate_l2"),
        ({"top_k": 2}, "top_k=2"),
        ({"sketch_dim": 16, "subsets_per_step": 12}, "sketch_dim"),
        ({"steps": 35}, "multiple of log_every"),
    ],
)
def test_bad_stage1_config(tiny, change, match):
    cfg = tiny.stride.stage1
    cfg.update(change)
    with pytest.raises(ValueError, match=match):
        stage1.fit_operators(_inputs(), cfg, jax.random.key(0), sharding.make_mesh())


def test_small_step_operators_match_the_damped_gauss_newton_solution(tiny):
    """The trained regime against its closed form (numpy, independent of the optimiser).

    With a small fidelity weight eps, the full KL (top_k = C) and gate L2 penalty lam, operator
    k minimises eps * mean_{i in S_k} CE_i + mean_{j not in S_k} KL_j + lam/2 ||B_k||^2, whose
    solution to first order in eps is vec(B_k) = -eps (G_k + lam I)^-1 g_k, with
    G_k = mean_{j not in S_k} Lambda_j (x) phi_j phi_j^T (Lambda = diag(p) - p p^T) and g_k the
    members' mean CE gradient. Responses CE_base(q) - CE_k(q) must then equal
    eps * g_q^T (G_k + lam I)^-1 g_k.
    """
    n, c, t, r, eps, lam = 60, 4, 20, 8, 1e-4, 1e-2
    cfg = tiny.stride.stage1
    cfg.update(
        rank=r, steps=600, log_every=100, ckpt_every=600, warmup_steps=20, lr=1e-4,
        lr_end_frac=0.01, top_k=c, stability_batch=2048, w_fidelity=eps, w_linearity=0.0,
        gate_l2=lam, lr_muon=0.0,
    )  # fmt: skip
    inputs = _inputs(n=n, c=c, t=t, top_k=c)
    graphdef, params, _ = stage1.fit_operators(inputs, cfg, jax.random.key(0), sharding.make_mesh())
    ops = nnx.merge(graphdef, params)
    phi = np.asarray(ops.basis(inputs.h_NxD), np.float64)
    z, y = np.asarray(inputs.logits_NxC, np.float64), np.asarray(inputs.y_N)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    g_n = np.einsum("nc,nr->ncr", p - np.eye(c)[y], phi).reshape(n, -1)  # dCE/dvec(B)
    lam_n = np.einsum("nc,cd->ncd", p, np.eye(c)) - np.einsum("nc,nd->ncd", p, p)
    gates = np.asarray(params["gates"][...], np.float64)
    got, want = [], []
    for k, row in enumerate(np.asarray(inputs.members_TxS)):
        mem = row[row < n]
        non = np.setdiff1d(np.arange(n), mem)
        gk = np.einsum("ncd,nr,ns->crds", lam_n[non], phi[non], phi[non]).reshape(c * r, -1)
        solve = np.linalg.solve(gk / len(non) + lam * np.eye(c * r), g_n[mem].mean(0))
        want.append(eps * g_n @ solve)  # predicted response of every example as a query
        logits = z + phi @ gates[k].T
        logq = logits - logits.max(-1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
        logp = np.log(p)
        got.append(-logp[np.arange(n), y] + logq[np.arange(n), y])
    got, want = np.concatenate(got), np.concatenate(want)
    assert np.corrcoef(got, want)[0, 1] > 0.98
    np.testing.assert_allclose(got.std(), want.std(), rtol=0.1)
