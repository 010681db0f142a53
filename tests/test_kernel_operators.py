"""Kernel operators (``stride.hook="kernels"``): subset gradients against autodiff, the gates
against the damped EK-FAC system they solve, the responses against EK-FAC's own influence
scores averaged over each subset, opspace in the kernel space, refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax import methods
from stride_jax.errors import ConfigError
from stride_jax.func import grads
from stride_jax.methods import influence
from stride_jax.stride import defaults, kernels, method
from stride_jax.stride import kernel_passes as passes


@pytest.fixture(scope="module")
def setup():
    """A tiny llama decoder (d=16, two SwiGLU MLPs) on 24 blocks, T = 12 kernel operators."""
    from conftest import tiny_decoder_task

    _, task = tiny_decoder_task(block_len=12, n_train=24, n_query=3)
    cfg = defaults.decoder()
    cfg.hook = "kernels"
    cfg.design.update(num_subsets=12, degree=2)
    cfg.stage1.curvature_batch = 5  # chunks that do not divide N: padding rows must not count
    fitted = method.fit(task, cfg, reuse=False)
    return task, cfg, fitted


def _plain(task, layers) -> dict:
    """The identity basis: ``subset_gradients`` in it are the kernels' own gradients."""
    from stride_jax.func.layers import kernel_shape

    shapes = [kernel_shape(task.params, p) for p in layers]
    return {"qa": [jnp.eye(i) for i, _ in shapes], "qs": [jnp.eye(o) for _, o in shapes]}


def _autodiff_kernel_grads(task, layers):
    """Reference: per-row gradients of the row loss w.r.t. each kernel (N x I x O)."""
    names = tuple(p + "/kernel" for p in layers)
    chosen, merge = grads.partition(task.params, names)
    data = task.arrays(task.train)

    def row_loss(ch, i):
        row = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1), data)
        return task.loss(merge(ch), row)[0]

    g = jax.vmap(jax.grad(row_loss), (None, 0))(chosen, jnp.arange(len(task.train)))
    return [np.asarray(g[n]) for n in names]


def test_site_steers_every_mlp_kernel(setup):
    task, cfg, fitted = setup
    assert fitted.site.layers == tuple(
        f"layers/{i}/mlp/{k}" for i in range(2) for k in ("down", "gate", "up")
    )
    assert [g.shape[0] for g in passes.gates(fitted.params)] == [12] * 6
    one = cfg.copy_and_resolve_references()
    one.kernels.layers = 1
    assert all(p.startswith("layers/1/") for p in task.site(one).layers)
    down = cfg.copy_and_resolve_references()
    down.kernels.params_filter = "mlp/down/"
    assert task.site(down).layers == ("layers/0/mlp/down", "layers/1/mlp/down")


def test_subset_gradients_are_member_means_of_autodiff_gradients(setup):
    task, cfg, fitted = setup
    site, design = fitted.site, fitted.design
    data = site.encode(task.train)
    got = passes.subset_gradients(task, site.layers, data, design, 5, _plain(task, site.layers))
    a = design.dense()
    mean = a / a.sum(1, keepdims=True)
    for g, ref in zip(got, _autodiff_kernel_grads(task, site.layers), strict=True):
        want = np.einsum("tn,nio->tio", mean, ref)
        np.testing.assert_allclose(np.asarray(g), want, rtol=2e-4, atol=1e-6 * np.abs(want).max())


def test_gates_solve_the_damped_kronecker_system(setup):
    """(F + lam) B = -g / c per layer, with F applied in its eigenbasis (the forward map, not
    the inverse the fit used)."""
    task, cfg, fitted = setup
    site = fitted.site
    state = site.curvature()
    data = site.encode(task.train)
    g_L = passes.subset_gradients(
        task, site.layers, data, fitted.design, 16, _plain(task, site.layers)
    )
    c = cfg.stage1.w_fidelity / (cfg.stage1.w_fidelity + cfg.stage1.w_stability)
    b_L = passes.gates(fitted.params)
    for b, g, qa, qs, lam in zip(b_L, g_L, state["qa"], state["qs"], state["lam"], strict=True):
        qa, qs, lam, b = (np.asarray(x, np.float64) for x in (qa, qs, lam, b))
        applied = np.einsum("ai,tij,bj->tab", qa, (qa.T @ b @ qs) * lam, qs)
        # float32 solve at a relative damping of 1e-3: round-off ~1e-3 of the largest entry
        np.testing.assert_allclose(-applied / c, np.asarray(g), rtol=1e-3, atol=2e-3 * abs(g).max())


@pytest.mark.parametrize(
    "fisher, curvature", [("true", "ekfac"), ("empirical", "ekfac"), ("true", "kfac")]
)
def test_responses_are_subset_means_of_ekfac_influence(setup, fisher, curvature):
    """y_k(q) = c * mean over S_k of EK-FAC's score(q, i) at STRIDE's damping and Fisher: the
    EK-FAC baseline's scoring path (preconditioned query gradients dotted with training
    gradients) is an independent route to the same numbers. Under kernels.fisher="empirical"
    the subset sums and the curvature share one backward pass per chunk."""
    task, cfg, fitted = setup
    if (fisher, curvature) != (cfg.kernels.fisher, "ekfac"):
        cfg = cfg.copy_and_resolve_references()
        cfg.kernels.update(fisher=fisher, curvature=curvature)
        fitted = method.fit(task, cfg, reuse=False)
    y = method.responses(fitted, task.query, None)
    ec = kernels.ekfac_config(task, cfg)
    assert ec.fisher == {"true": "sampled", "empirical": "empirical"}[fisher]
    ekfac = methods.get(curvature, "decoder")  # the K-FAC / EK-FAC baselines' own code
    s = ekfac.score(task, ekfac.fit(task, ec), task.query, ec)
    a = fitted.design.dense()
    c = cfg.stage1.w_fidelity / (cfg.stage1.w_fidelity + cfg.stage1.w_stability)
    want = c * s @ (a / a.sum(1, keepdims=True)).T
    np.testing.assert_allclose(y, want, rtol=2e-3, atol=1e-3 * np.abs(want).max())
    scores = method.score(task, fitted, task.query, cfg)
    assert scores.shape == (3, 24) and np.isfinite(scores).all()


@pytest.mark.parametrize(
    "fisher, curvature, rank",
    [("true", "ekfac", 0), ("empirical", "ekfac", 0), ("true", "ekfac", 4), ("true", "kfac", 0)],
)
def test_fused_pass_equals_the_curvature_then_a_subset_pass(setup, fisher, curvature, rank):
    """The subset means ride along a pass the curvature makes anyway (``fused_fit``): at full
    rank in the kernels' own coordinates (EK-FAC's eigenvalue correction or K-FAC's factors);
    with a rank, EK-FAC's eigenvalue correction rotated into its eigenbases cut to the top
    ``rank`` input directions. The same numbers as the curvature's own fit followed by a
    separate pass over the rows in that basis."""
    task, cfg, fitted = setup
    cfg = cfg.copy_and_resolve_references()
    cfg.kernels.update(fisher=fisher, curvature=curvature, rank=rank)
    site = task.site(cfg)
    data = site.encode(task.train)
    ek, ec = kernels.ekfac_config(task, cfg), kernels.eigen_correct(cfg)
    state, got, key, ok = passes.fused_fit(task, ek, ec, fitted.design, rank)
    assert bool(ok)  # every row's gradient finite
    ref_state = site.curvature()
    basis = passes.input_basis(ref_state, rank) if rank else _plain(task, site.layers)
    ref = passes.subset_gradients(task, site.layers, data, fitted.design, 5, basis)
    assert key == ("subset_grads" if rank else "subset_sums")
    for a, b in zip(state["lam"], ref_state["lam"], strict=True):  # round-off: the smallest
        b = np.asarray(b)  # eigenvalues (1e-3 of the largest) differ in their 4th digit
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    for g, want in zip(got, ref, strict=True):
        want = np.asarray(want)
        assert g.shape == want.shape and (rank == 0 or g.shape[1] <= rank)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-3, atol=1e-5 * abs(want).max())


def test_fused_flag_turns_false_on_a_non_finite_row_gradient():
    """The fused passes' finiteness flag (``_into_subsets``, read by the fit instead of a pass
    over the T x P sums) against a per-entry reference: it stays true over finite chunks of
    both signs, turns false on a chunk holding a NaN or an infinity, and stays false."""
    rng = np.random.default_rng(0)
    t, c = 6, 4
    subsets_NxD = jnp.asarray(rng.integers(0, t, size=(8, 2)), jnp.int32)
    sizes = jnp.ones(t, jnp.float32)
    sums = [jnp.zeros((t, 3, 2)), jnp.zeros((t, 2, 5))]
    acc = (sums, (subsets_NxD, sizes), jnp.asarray(True))
    w_C, i_C = jnp.ones(c), jnp.arange(c)

    def chunk(bad=None):
        rg = [jnp.asarray(rng.normal(size=(c, *g.shape[1:])), jnp.float32) for g in sums]
        if bad is not None:
            rg[1] = rg[1].at[2, 1, 3].set(bad)
        return rg

    seen = []
    for bad in (None, None, np.nan, None):
        rg = chunk(bad)
        acc = passes._into_subsets(acc, rg, w_C, i_C)
        seen.append(all(np.isfinite(np.asarray(g)).all() for g in rg))
        assert bool(acc[2]) == all(seen)
    for bad in (np.inf, -np.inf):
        fresh = (sums, (subsets_NxD, sizes), jnp.asarray(True))
        assert not bool(passes._into_subsets(fresh, chunk(bad), w_C, i_C)[2])


def test_kfac_with_a_rank_needs_a_pass_of_its_own(setup):
    task, cfg, fitted = setup
    cfg = cfg.copy_and_resolve_references()
    cfg.kernels.update(curvature="kfac", rank=4)
    with pytest.raises(ValueError, match="full rank only"):
        passes.fused_fit(task, kernels.ekfac_config(task, cfg), False, fitted.design, 4)
    low = method.fit(task, cfg, reuse=False)  # the site takes the separate pass instead
    assert all(g.shape[1] <= 4 for g in low.params["subset_grads"])


def test_responses_in_query_blocks_equal_all_at_once(setup, monkeypatch):
    """The responses contract the subset gradients once per block of queries
    (``_DOT_BYTES``): a block of one chunk (here 5 rows, with padding) gives the same
    numbers as all queries in one block."""
    task, cfg, fitted = setup
    query = task.train.subset(np.arange(9))  # two blocks of 5, the second padded
    site = fitted.site
    whole = site.stage2_responses(None, fitted.params, site.encode(query), query, None)
    monkeypatch.setattr(passes, "_DOT_BYTES", 1)
    blocks = site.stage2_responses(None, fitted.params, site.encode(query), query, None)
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(whole), rtol=1e-5, atol=1e-8)


def test_one_forward_gives_both_label_sets_gradients(setup):
    """``dense_io(with_data=True)`` under the sampled Fisher pulls the data labels' gradients
    back from the same forward pass (one batched pull of both cotangents): equal to the two
    separate calls (same key) up to float32 round-off, relative to each array's largest."""
    task, _, fitted = setup
    rows = task.arrays(task.train.subset(np.arange(4)))
    key, layers = jax.random.key(3), fitted.site.layers
    a_L, mask, [(_, g_s)], g_d = task.dense_io(task.params, rows, layers, "sampled", key, True)
    ref_a, _, [(_, ref_s)] = task.dense_io(task.params, rows, layers, "sampled", key)
    _, _, [(_, ref_d)] = task.dense_io(task.params, rows, layers, "empirical")
    for got, want in [(a_L, ref_a), (g_s, ref_s), (g_d, ref_d)]:
        for x, y in zip(got, want, strict=True):
            y = np.asarray(y)
            np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5, atol=1e-6 * np.abs(y).max())
    assert not np.allclose(np.asarray(g_s[0]), np.asarray(g_d[0]))  # two label sets


def test_opspace_in_the_kernel_space_is_ekfac_at_strides_settings(setup):
    task, cfg, _ = setup
    op = methods.get("opspace", "decoder")
    got = op.score(task, op.fit(task, cfg), task.query, cfg)
    ec = kernels.ekfac_config(task, cfg)
    assert ec.fisher == "empirical" and ec.relative_damping and ec.layers == 2
    assert ec.damping == pytest.approx(cfg.stage1.gate_l2 / (cfg.stage1.w_fidelity + 1.0))
    want = influence.kfac_score(task, influence.ekfac_fit(task, ec), task.query, ec)
    # Two code paths (EK-FAC's preconditioned query gradients dotted with formed training
    # gradients; opspace's rotated gradients): the same numbers up to float32 round-off.
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_classifier_kernel_operators_match_ekfac(fisher):
    from test_influence import make_task

    task, query = make_task(hidden=(8,), n=30, n_query=5, in_dim=6, seed=1, steps=100)
    cfg = defaults.classifier()
    cfg.update(hook="kernels", responses="linear")
    cfg.kernels.fisher = fisher
    cfg.design.update(num_subsets=15, degree=2)
    fitted = method.fit(task, cfg, reuse=False)
    assert fitted.site.layers == ("layers/0", "head")
    y = method.responses(fitted, query, None)
    ec = kernels.ekfac_config(task, cfg)
    ekfac = methods.get("ekfac", "classifier")
    s = ekfac.score(task, ekfac.fit(task, ec), query, ec)
    a = fitted.design.dense()
    c = cfg.stage1.w_fidelity / (cfg.stage1.w_fidelity + cfg.stage1.w_stability)
    want = c * s @ (a / a.sum(1, keepdims=True)).T
    np.testing.assert_allclose(y, want, rtol=2e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(responses="forward"), "first-order responses only"),
        (dict(stage1=dict(steps=100)), "closed-form Gauss-Newton step"),
        (dict(stage1=dict(init="zero")), "closed-form Gauss-Newton step"),
        (dict(stage1=dict(gate_l2=0.0)), "gate_l2 > 0"),
        (dict(kernels=dict(layers=-1)), "kernels.layers must be >= 0"),
        (dict(kernels=dict(rank=-2)), "kernels.rank must be >= 0"),
        (dict(kernels=dict(fisher="sampled")), "kernels.fisher must be one of"),
        (dict(kernels=dict(curvature="exact")), "kernels.curvature must be one of"),
        (dict(kernels=dict(params_filter="nothing/here")), "matches no parameter path"),
        (dict(hook="mlp"), "stride.hook must be one of"),
    ],
)
def test_bad_settings_are_refused(setup, change, match):
    task, cfg, _ = setup
    bad = cfg.copy_and_resolve_references()
    for key, value in change.items():
        if isinstance(value, dict):
            bad[key].update(value)
        else:
            bad[key] = value
    with pytest.raises((ConfigError, ValueError), match=match):
        task.site(bad)


def test_operators_that_do_not_fit_are_refused_before_any_work(setup, monkeypatch):
    from stride_jax import resources

    task, cfg, fitted = setup
    p = kernels.gate_params(fitted.site)
    assert p == sum(int(np.prod(g.shape[1:])) for g in fitted.params["subset_sums"])
    monkeypatch.setattr(resources, "available_bytes", lambda: 8 * 12 * p - 1)
    explicit = cfg.copy_and_resolve_references()
    explicit.kernels.layers = 2  # as asked: not narrowed automatically
    match = r"12 operators x [0-9,]+ gate parameters.*stride\.kernels\.layers"
    with pytest.raises(ConfigError, match=match):
        method.fit(task, explicit, reuse=False)


def test_automatic_layers_narrow_to_the_last_blocks_that_fit(setup, monkeypatch, caplog):
    """kernels.layers = 0: every block when it fits, else the last blocks that do (logged);
    opspace reads the same narrowed config. An explicit kernels.layers is kept."""
    from stride_jax import resources

    task, cfg, fitted = setup
    per_block = kernels.gate_params(fitted.site) // 2
    monkeypatch.setattr(resources, "available_bytes", lambda: 8 * 12 * per_block + 1)
    site = task.site(cfg)
    assert all(p.startswith("layers/1/") for p in site.layers) and site.cfg.kernels.layers == 1
    assert kernels.ekfac_config(task, site.cfg).layers == 1
    assert "auto: stride.kernels.layers: 0 -> 1 of 2 blocks" in caplog.text
    explicit = cfg.copy_and_resolve_references()
    explicit.kernels.layers = 2
    assert len(task.site(explicit).layers) == 6
    monkeypatch.setattr(resources, "available_bytes", lambda: 8 * 12 * per_block - 1)
    with pytest.raises(ConfigError, match="kernels.layers"):
        method.fit(task, cfg, reuse=False)


def test_low_rank_operators_read_the_top_input_directions(setup):
    """kernels.rank = r: the gates are the damped step restricted to each kernel's top-r input
    eigenvectors, the responses are -<G_q, B_k> with autodiff query gradients, and opspace
    is the restricted influence; P shrinks to r x O per kernel."""
    task, cfg, full = setup
    low = cfg.copy_and_resolve_references()
    low.kernels.rank = 4
    fitted = method.fit(task, low, reuse=False)
    site = fitted.site
    shapes = [g.shape for g in passes.gates(full.params)]
    assert (
        kernels.gate_params(site)
        == sum(min(4, i) * o for _, i, o in shapes)
        < sum(i * o for _, i, o in shapes)
    )
    state = site.curvature()
    data = site.encode(task.train)
    g_L = passes.subset_gradients(
        task, site.layers, data, fitted.design, 16, _plain(task, site.layers)
    )
    c = cfg.stage1.w_fidelity / (cfg.stage1.w_fidelity + cfg.stage1.w_stability)
    b_L = passes.gates(fitted.params)
    for b, g, qa, qs, lam in zip(b_L, g_L, state["qa"], state["qs"], state["lam"], strict=True):
        qa, qs, lam, g = (np.asarray(x, np.float64) for x in (qa, qs, lam, g))
        r = min(4, qa.shape[1])
        q_r, lam_r = qa[:, -r:], lam[-r:]
        want = -c * np.einsum("ir,tro,jo->tij", q_r, (q_r.T @ g @ qs) / lam_r, qs)
        np.testing.assert_allclose(b, want, rtol=2e-3, atol=2e-3 * abs(want).max())
    # responses against autodiff query gradients and the formed gates
    query_task = dataclasses.replace(task, train=task.query)
    g_q = _autodiff_kernel_grads(query_task, site.layers)
    pairs = zip(g_q, b_L, strict=True)
    want_y = -sum(np.einsum("qio,tio->qt", gq, np.asarray(b)) for gq, b in pairs)
    y = method.responses(fitted, task.query, None)
    np.testing.assert_allclose(y, want_y, rtol=2e-3, atol=2e-3 * np.abs(want_y).max())
    # opspace at rank r: <restricted (F + lam)^-1 G_q, G_i>
    op = methods.get("opspace", "decoder")
    got = op.score(task, op.fit(task, low), task.query, low)
    g_n = _autodiff_kernel_grads(task, site.layers)
    want_s = 0
    for gq, gn, qa, qs, lam in zip(g_q, g_n, state["qa"], state["qs"], state["lam"], strict=True):
        qa, qs, lam = (np.asarray(x, np.float64) for x in (qa, qs, lam))
        r = min(4, qa.shape[1])
        q_r, lam_r = qa[:, -r:], lam[-r:]
        pre = np.einsum("ir,qro,jo->qij", q_r, np.einsum("ir,qio,oj->qrj", q_r, gq, qs) / lam_r, qs)
        want_s = want_s + np.einsum("qio,nio->qn", pre, gn)
    np.testing.assert_allclose(got, want_s, rtol=2e-3, atol=2e-3 * np.abs(want_s).max())


def test_stage1_check_refuses_non_finite_gradients_and_bad_eigenvalues():
    """The fit's check (one summed reduction over the T x P gradients) against a per-entry
    reference: any NaN or infinity in a gradient, any non-positive or non-finite damped
    eigenvalue is refused; finite gradients of both signs pass."""
    rng = np.random.default_rng(0)
    g_L = [jnp.asarray(rng.normal(size=(5, 3, 4)), jnp.float32) for _ in range(2)]
    lam_L = [jnp.asarray(rng.uniform(0.1, 1, size=(3, 4)), jnp.float32) for _ in range(2)]

    def reference(g, lam):
        finite = all(np.isfinite(np.asarray(x)).all() for x in [*g, *lam])
        return finite and all((np.asarray(m) > 0).all() for m in lam)

    cases = [(g_L, lam_L)]
    for bad in (np.nan, np.inf, -np.inf):
        cases.append(([g_L[0], g_L[1].at[2, 1, 3].set(bad)], lam_L))
        cases.append((g_L, [lam_L[0].at[0, 0].set(bad), lam_L[1]]))
    cases.append(([g_L[0].at[0, 0, 0].set(np.inf), g_L[1].at[0, 0, 0].set(-np.inf)], lam_L))
    for bad in (0.0, -1e-3):
        cases.append((g_L, [lam_L[0], lam_L[1].at[1, 2].set(bad)]))
    got = [kernels._finite_and_positive(g, lam) for g, lam in cases]
    assert got == [reference(g, lam) for g, lam in cases]
    assert got[0] and not any(got[1:])
