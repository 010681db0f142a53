"""The kernel recovery (``stride.recovery="kernel"``, ``stride/posterior.py``): decoding each
query's T responses through the training rows' own responses; and the exact solve at T >= N
(``stride.recovery="solve"``), against numpy's least squares.

References are independent of the decoder's formula: the query's gradient projected onto the
span of the subsets' mean gradients by least squares (numpy), and, on a real task, the
operator-space influence between all rows (``opspace``) pushed through the same projection.
"""

import jax
import numpy as np
import pytest

from stride_jax import methods
from stride_jax.errors import ConfigError
from stride_jax.stride import defaults, kernels, method, posterior, subsets
from stride_jax.stride import kernel_passes as passes


def _linear_system(n=30, p=50, t=12, q=4, degree=3, seed=0):
    """Rows' gradients G (n x p), queries' z (q x p), an expander design and the responses
    a site with first-order responses would give: y = c A G z, R = c G (A G)^T."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, p)) * rng.uniform(0.2, 2.0, size=(1, p))
    z = rng.normal(size=(q, p))
    design = subsets.expander(jax.random.key(seed), t, n, degree)
    a = design.dense() / np.maximum(design.sizes_T, 1)[:, None]
    return g, z, design, a


def _projected(g, z, a):
    """b_q = G z_q with z_q replaced by its least-squares projection onto the rows of A G."""
    s = a @ g  # T x P: the subsets' mean gradients
    coef, *_ = np.linalg.lstsq(s.T, z.T, rcond=None)  # P x Q onto span(S^T)
    return (g @ (s.T @ coef)).T


@pytest.mark.parametrize("c", [0.01, -3.0])
def test_decoder_is_the_projection_of_the_query_gradient_onto_the_subsets(c):
    g, z, design, a = _linear_system()
    r = c * g @ (a @ g).T  # N x T: each training row's response to each operator
    y = c * (a @ g @ z.T).T  # Q x T
    dec = posterior.factor(design, r.astype(np.float32), jitter_frac=1e-10)
    got = posterior.decode(dec, y)
    want = c * _projected(g, z, a)  # the decoder keeps the responses' scale
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert np.corrcoef(got.ravel(), (g @ z.T).T.ravel())[0, 1] < 0.999  # T < N: not exact


def test_decoder_at_full_rank_returns_the_influence_itself():
    g, z, design, a = _linear_system(n=20, p=60, t=20, degree=3)
    assert np.linalg.matrix_rank(a) == 20
    r = g @ (a @ g).T
    got = posterior.decode(posterior.factor(design, r, 1e-10), (a @ g @ z.T).T)
    want = (g @ z.T).T
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_subset_means_of_the_rows():
    g, _, design, a = _linear_system()
    r = np.random.default_rng(1).normal(size=(design.num_examples, design.num_subsets))
    np.testing.assert_allclose(posterior.subset_means(design, r), a @ r, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="expected"):
        posterior.subset_means(design, r[:, :-1])


def test_bad_responses_are_refused():
    g, _, design, a = _linear_system()
    r = (g @ (a @ g).T).astype(np.float32)
    bad = r.copy()
    bad[3, 2] = np.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        posterior.factor(design, bad, 1e-4)
    with pytest.raises(FloatingPointError, match="zero"):
        posterior.factor(design, np.zeros_like(r), 1e-4)
    indefinite = r.copy()
    indefinite[:, 0] = -50 * np.abs(indefinite).max()  # one operator's responses flipped, huge
    with pytest.raises(FloatingPointError, match="recovery_jitter"):
        posterior.factor(design, indefinite, 0.0)
    dec = posterior.factor(design, r, 1e-4)
    with pytest.raises(ValueError, match="T ="):
        posterior.decode(dec, np.zeros((2, design.num_subsets + 1)))


@pytest.fixture(scope="module")
def task():
    from conftest import tiny_decoder_task

    return tiny_decoder_task(block_len=12, n_train=24, n_query=3)[1]


def _cfg(t, recovery="kernel", degree=2):
    cfg = defaults.decoder()
    cfg.design.update(num_subsets=t, degree=degree)
    cfg.stage1.curvature_batch = 5
    cfg.recovery = recovery
    return cfg


@pytest.mark.parametrize("t, degree", [(8, 2), (24, 5)])  # 24 x 24 at degree 5: full rank
def test_kernel_operators_decode_to_the_projected_operator_space_influence(task, t, degree):
    """On a real decoder: STRIDE's scores with recovery="kernel" against the operator-space
    influence between every pair of rows (``opspace_scores``, EK-FAC at STRIDE's settings)
    pushed through K A^T (A K A^T)^-1 A; at T = N (24 rows) that is the influence itself."""
    cfg = _cfg(t, degree=degree)
    cfg.recovery_jitter = 1e-9  # the formula itself (cond(A K A^T) ~ 1e5 at T = N here)
    fitted = method.fit(task, cfg, reuse=False)
    assert fitted.decoder is not None and fitted.seconds["train_responses"] >= 0
    got = np.asarray(method.score(task, fitted, task.query, cfg), np.float64)
    chunk, layers = kernels.chunk_rows(task, cfg), fitted.site.layers
    basis = {k: fitted.params[k] for k in ("qa", "qs", "lam")}
    b = np.asarray(passes.opspace_scores(task, layers, chunk, basis, task.query), np.float64)
    k = np.asarray(passes.opspace_scores(task, layers, chunk, basis, task.train), np.float64)
    k = (k + k.T) / 2
    a = fitted.design.dense() / np.maximum(fitted.design.sizes_T, 1)[:, None]
    c = -float(fitted.params["scale"])
    ka = k @ a.T
    want = c * (ka @ np.linalg.solve(a @ ka, a @ b.T)).T
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-3 * np.abs(want).max())
    if t == len(task.train):
        assert np.linalg.matrix_rank(a) == t
        np.testing.assert_allclose(got, c * b, rtol=2e-2, atol=2e-3 * np.abs(b).max())


def test_auto_is_the_kernel_recovery_below_n_and_the_exact_solve_at_n(task):
    """ "auto": for closed-form operators the kernel recovery at T < N and, with linear
    responses, the exact solve at T >= N; the Lasso for Adam-trained operators, for forward
    responses at T >= N, and when the arrays would not fit."""
    n = len(task.train)
    for t, want in [(8, "kernel"), (n, "solve"), (n + 6, "solve")]:
        design = method.design_for(_cfg(t, "auto").design, n, "decoder")
        assert posterior.resolve(_cfg(t, "auto"), design) == want
    assert isinstance(method.fit(task, _cfg(n, "auto"), reuse=False).decoder, posterior.Solve)
    forward = _cfg(n, "auto")
    forward.responses = "forward"
    assert posterior.resolve(forward, method.design_for(forward.design, n, "decoder")) == "lasso"
    adam = _cfg(8, "auto")
    adam.hook = "residual"
    adam.stage1.update(init="zero", steps=10)  # Adam-trained operators: the Lasso
    assert posterior.resolve(adam, method.design_for(adam.design, n, "decoder")) == "lasso"
    adam.stage1.update(init="newton", steps=0)  # any site's closed-form step: the kernel one
    assert posterior.resolve(adam, method.design_for(adam.design, n, "decoder")) == "kernel"
    small = _cfg(8, "auto")
    design = method.design_for(small.design, n, "decoder")
    need = posterior.memory_need(n, 8)
    with pytest.MonkeyPatch.context() as mp:  # R would not fit: auto falls back to the Lasso
        mp.setattr(posterior, "_available", lambda: need)
        assert posterior.resolve(small, design) == "lasso"
        mp.setattr(posterior, "_available", lambda: 2 * need + 2)
        assert posterior.resolve(small, design) == "kernel"
    full = method.design_for(_cfg(n, "auto").design, n, "decoder")
    with pytest.MonkeyPatch.context() as mp:  # nor would A^T A, or N is past SOLVE_MAX_N
        mp.setattr(posterior, "_available", lambda: 2 * 8 * n * n)
        assert posterior.resolve(_cfg(n, "auto"), full) == "lasso"
        mp.setattr(posterior, "_available", lambda: 4 * 8 * n * n)
        assert posterior.resolve(_cfg(n, "auto"), full) == "solve"
        mp.setattr(posterior, "SOLVE_MAX_N", n - 1)
        assert posterior.resolve(_cfg(n, "auto"), full) == "lasso"
    assert defaults.decoder().recovery == "auto"
    assert defaults.classifier().recovery == "auto"


def test_auto_design_is_interleaved_at_n_and_the_expander_below(monkeypatch):
    cfg = defaults.decoder()
    assert cfg.design.kind == "auto" and defaults.classifier().design.kind == "expander"
    said = []
    monkeypatch.setattr(method.logging, "info", lambda msg, *args: said.append(msg % args))
    for t, want in [(40, "interleaved"), (50, "interleaved"), (20, "expander")]:
        cfg.design.num_subsets = t
        design = method.design_for(cfg.design, 40, "decoder")
        assert design.kind == want and any(f"auto -> '{want}'" in line for line in said)
        said.clear()
    cfg.design.update(num_subsets=40, kind="expander")
    assert method.design_for(cfg.design, 40, "decoder").kind == "expander"


def _dense_mean(design):
    return design.dense() / np.maximum(design.sizes_T, 1)[:, None]


@pytest.mark.parametrize(
    "kind, t, n, degree",
    [
        ("interleaved", 20, 20, 4),  # T = N, full rank
        ("interleaved", 33, 20, 3),  # T > N, unequal subset sizes
        ("expander", 20, 20, 4),  # T = N, d divides T: blocks of 5 rows, rank 17
        ("expander", 45, 20, 5),
    ],
)
def test_exact_solve_is_the_least_squares_solution(kind, t, n, degree):
    """Against numpy's least squares on the dense mean operator (the minimum-norm solution
    where the design is rank-deficient); at full rank the exact influences come back."""
    rng = np.random.default_rng(t + n)
    design = subsets.make_design(jax.random.key(t), kind, t, n, degree)
    a = _dense_mean(design)
    b = rng.normal(size=(5, n))
    y = (a @ b.T).T + 1e-3 * rng.normal(size=(5, t))  # not exactly consistent at T > N
    got = posterior.decode(posterior.solve_factor(design), y)
    want = np.linalg.lstsq(a, y.T, rcond=None)[0].T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    if np.linalg.matrix_rank(a) == n:
        clean = posterior.decode(posterior.solve_factor(design), (a @ b.T).T)
        np.testing.assert_allclose(clean, b, rtol=1e-4, atol=1e-4)


def test_exact_solve_logs_the_null_directions_of_a_rank_deficient_design(caplog):
    blocks = subsets.expander(jax.random.key(0), 20, 20, 4)  # 4 blocks of 5 rows: rank 17
    assert np.linalg.matrix_rank(_dense_mean(blocks)) == 17
    with caplog.at_level("WARNING"):
        posterior.solve_factor(blocks)
    assert "3 of 20 directions" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        posterior.solve_factor(subsets.interleaved(jax.random.key(0), 20, 20, 4))
    assert "rank-deficient" not in caplog.text


def test_exact_solve_refuses_a_compressive_design_and_wrong_shapes(task, monkeypatch):
    n = len(task.train)
    dec = posterior.solve_factor(subsets.interleaved(jax.random.key(0), 20, 20, 4))
    with pytest.raises(ValueError, match="T = 20"):
        posterior.decode(dec, np.zeros((2, 21)))
    monkeypatch.setattr(kernels.KernelSite, "fit_operators", _never)
    with pytest.raises(ConfigError, match="needs T >= N"):
        method.fit(task, _cfg(8, "solve"), reuse=False)
    monkeypatch.setattr(posterior, "_available", lambda: 1000)
    with pytest.raises(ConfigError, match="normal equations"):
        method.fit(task, _cfg(n, "solve"), reuse=False)


def test_kernel_operators_solved_exactly_give_the_operator_space_influence(task):
    """STRIDE at T = N with recovery="solve" (an interleaved design: full rank) returns the
    operator-space influence (``opspace_scores``) times the gates' scale."""
    n = len(task.train)
    cfg = _cfg(n, "solve", degree=5)
    cfg.design.kind = "interleaved"
    assert np.linalg.matrix_rank(method.design_for(cfg.design, n, "decoder").dense()) == n
    fitted = method.fit(task, cfg, reuse=False)
    assert isinstance(fitted.decoder, posterior.Solve) and fitted.seconds["solve_factor"] >= 0
    got = method.attribute_rows(task, fitted, task.query, cfg)
    assert (got.nnz_Q == n).all() and (got.lam_Q == 0).all()
    chunk, layers = kernels.chunk_rows(task, cfg), fitted.site.layers
    basis = {k: fitted.params[k] for k in ("qa", "qs", "lam")}
    b = np.asarray(passes.opspace_scores(task, layers, chunk, basis, task.query), np.float64)
    want = -float(fitted.params["scale"]) * b
    np.testing.assert_allclose(got.scores_QxN, want, rtol=2e-2, atol=2e-3 * np.abs(want).max())


def test_bad_recovery_settings_are_refused_before_any_work(task, monkeypatch):
    with pytest.raises(ConfigError, match="recovery must be one of"):
        method.fit(task, _cfg(8, "ridge"), reuse=False)
    monkeypatch.setattr(posterior, "_available", lambda: 1000)
    monkeypatch.setattr(kernels.KernelSite, "fit_operators", _never)
    with pytest.raises(ConfigError, match="recovery='lasso'"):
        method.fit(task, _cfg(8), reuse=False)
    monkeypatch.undo()
    monkeypatch.setattr(kernels.KernelSite, "fit_operators", _never)
    cfg = _cfg(8)
    cfg.recovery_jitter = -1.0
    with pytest.raises(ConfigError, match="recovery_jitter"):
        method.fit(task, cfg, reuse=False)


def _never(*args, **kwargs):
    raise AssertionError("stage 1 ran before the refusal")


def test_stride_method_registry_runs_the_kernel_recovery(task):
    m = methods.get("stride", "decoder")
    cfg = _cfg(8)
    scores = np.asarray(m.score(task, m.fit(task, cfg), task.query, cfg))
    assert scores.shape == (len(task.query), len(task.train)) and np.isfinite(scores).all()
    assert np.count_nonzero(scores) == scores.size  # dense, unlike the Lasso's


def test_forward_responses_that_are_not_positive_definite_are_floored(caplog):
    """A's mean responses with negative eigenvalues (as forward responses can give): the
    eigenvalues below the jitter's floor are raised to it, against a dense numpy reference."""
    g, z, design, a = _linear_system()
    rng = np.random.default_rng(3)
    r = g @ (a @ g).T
    w0, v0 = np.linalg.eigh(a @ r)
    u = v0[:, :1]  # push A R's smallest eigenvalue below zero: R -= lam A^+ u u^T
    r = r - (w0[0] + 0.5 * np.mean(w0)) * np.linalg.pinv(a) @ u @ u.T
    y = rng.normal(size=(4, 12))
    m = a @ r
    m = (m + m.T) / 2
    w, v = np.linalg.eigh(m)
    assert w.min() < 0  # the perturbation made it indefinite
    floor = 1e-2 * np.mean(np.diag(m))
    want = (r @ (v @ np.diag(1 / np.maximum(w, floor)) @ v.T) @ y.T).T
    with caplog.at_level("WARNING"):
        dec = posterior.factor(design, r, 1e-2)
    assert dec.factor[0] == "eigh" and "not positive definite" in caplog.text
    got = posterior.decode(dec, y)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_the_job_refuses_a_bad_recovery_in_a_variant_before_any_work():
    from stride_jax.job import config as job_config

    config = job_config.base_config("decoder")
    config.variants.odd = dict(method="stride", recovery_jitter=-1.0)
    with pytest.raises(ConfigError, match="recovery_jitter must be >= 0"):
        job_config.validate(config)


@pytest.mark.parametrize("kind", ["decoder", "classifier"])
def test_the_job_refuses_an_unknown_design_kind_for_either_task_kind(kind):
    from stride_jax.job import config as job_config

    config = job_config.base_config(kind)
    config.stride.design.kind = "random"
    with pytest.raises(ConfigError, match="design.kind must be one of .*'auto'.*'random'"):
        job_config.validate(config)
    config.stride.design.kind = "interleaved"
    job_config.validate(config)
