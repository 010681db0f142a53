"""Jitted passes kept per task (``func.programs``): a second fit or score on the same task
compiles nothing and gives the same numbers; a new key, a new task or a new model graph builds
new programs; the parameters are the programs' arguments (new weights, same programs, new
numbers)."""

import dataclasses

import jax
import numpy as np
import pytest

from stride_jax import methods, profiling
from stride_jax.func import programs
from stride_jax.stride import defaults, method


@pytest.fixture(scope="module")
def task():
    from conftest import tiny_decoder_task

    return tiny_decoder_task(block_len=12, n_train=20, n_query=3)[1]


def _ekfac(task, **overrides):
    m = methods.get("ekfac", task.kind)
    cfg = m.default_config(task.kind)
    cfg.update(layers=2, chunk=8, **overrides)
    return m, cfg


def _fit_score(task, m, cfg):
    with profiling.CompileTime() as c:
        state = m.fit(task, cfg)
        scores = np.asarray(m.score(task, state, task.query, cfg))
    return scores, c.programs


def test_per_task_builds_once_per_key():
    class Task:  # any object with a __dict__; no graphdef
        pass

    a, b, built = Task(), Task(), []

    def build():
        built.append(1)
        return lambda x: x + 1

    f = programs.per_task(a, ("k", 1), build)
    assert programs.per_task(a, ("k", 1), build) is f
    assert programs.per_task(a, ("k", 2), build) is not f
    assert programs.per_task(b, ("k", 1), build) is not f
    assert len(built) == 3 and programs.count(a) == 2 and programs.count(b) == 1
    assert float(f(1.0)) == 2.0
    a.graphdef = "another model"  # a replaced model graph: its own programs
    assert programs.per_task(a, ("k", 1), build) is not f and len(built) == 4
    assert programs.memo(a, "m", lambda: [3]) == [3]
    assert programs.memo(a, "m", lambda: [4]) == [3]  # kept, not recomputed


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_second_ekfac_call_compiles_nothing_and_matches(task, fisher):
    m, cfg = _ekfac(task, fisher=fisher)
    first, n_first = _fit_score(task, m, cfg)
    again, n_again = _fit_score(task, m, cfg)
    assert n_first > 0 and n_again == 0
    np.testing.assert_array_equal(again, first)


def test_new_weights_reuse_the_programs_and_change_the_scores(task):
    """The weights are arguments: a task whose params are replaced (as a retrained model
    would be) runs the same programs on the new weights, not the old ones baked in."""
    m, cfg = _ekfac(task, fisher="empirical")
    before, _ = _fit_score(task, m, cfg)
    old = task.params
    try:
        task.params = jax.tree.map(lambda x: x * 1.1, old)
        after, n = _fit_score(task, m, cfg)
        fresh = dataclasses.replace(task)  # a new task object: no programs kept
        reference, n_fresh = _fit_score(fresh, m, cfg)
    finally:
        task.params = old
    assert n == 0 and n_fresh > 0 and programs.count(fresh) > 0
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, reference, rtol=1e-5, atol=1e-6)


def test_an_equal_model_graph_shares_the_programs(task):
    m, cfg = _ekfac(task, fisher="empirical")
    _fit_score(task, m, cfg)
    kept = programs.count(task)
    other = dataclasses.replace(task)
    other.__dict__.update(task.__dict__)  # the same store...
    other.graphdef = jax.tree.map(lambda x: x, task.graphdef)  # ...under an equal graph
    _, n_equal = _fit_score(other, m, cfg)
    assert n_equal == 0  # an equal graph is the same model: the programs apply
    assert programs.count(task) == kept


def test_second_stride_kernel_fit_and_score_compile_nothing(task):
    """STRIDE's kernel operators: fused stage 1 and the responses are kept per task; a new
    design (another seed) reuses them too, since the design's tables are arguments."""
    cfg = defaults.decoder()
    cfg.design.update(num_subsets=10, degree=2)
    cfg.stage1.curvature_batch = 8

    def run(c):
        with profiling.CompileTime() as ct:
            fitted = method.fit(task, c, reuse=False)
            scores = np.asarray(method.score(task, fitted, task.query, c))
        return scores, ct.programs

    first, n_first = run(cfg)
    again, n_again = run(cfg)
    assert n_first > 0 and n_again == 0
    np.testing.assert_array_equal(again, first)
    other = cfg.copy_and_resolve_references()
    other.design.seed = cfg.design.seed + 1
    moved, n_other = run(other)
    assert n_other == 0
    assert not np.allclose(moved, first)  # a new design, new subsets: new scores


def test_ekfac_scores_queries_in_blocks_when_they_do_not_fit(task, monkeypatch):
    """``kfac_score`` splits the queries into blocks (the last one padded) when their
    preconditioned gradients would not fit; the scores are the unblocked ones."""
    from stride_jax.methods import influence

    m, cfg = _ekfac(task, fisher="empirical")
    state = m.fit(task, cfg)
    whole = np.asarray(m.score(task, state, task.query, cfg))
    num_params = sum(x.size for x in state["lam"])
    assert influence.query_block(len(task.query), num_params) == len(task.query)
    monkeypatch.setattr(influence, "_QUERY_BYTES", 8 * num_params * 2)  # two queries a block
    assert influence.query_block(len(task.query), num_params) == 2
    blocked = np.asarray(m.score(task, state, task.query, cfg))
    assert blocked.shape == whole.shape == (len(task.query), len(task.train))
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max())
    monkeypatch.setattr(influence, "_QUERY_BYTES", 1)  # nothing fits: one query at a time
    assert influence.query_block(len(task.query), num_params) == 1


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("graddot", {}),
        ("trak1", dict(proj_dim=16)),
        ("trak1", dict(proj_dim=16, max_proj_bytes=1)),  # R regenerated per row
        ("logra", dict(init="pca", rank_in=4, rank_out=4)),
        ("logra", dict(init="random", rank_in=4, rank_out=4)),
    ],
)
def test_second_gradient_baseline_call_compiles_nothing(task, name, overrides):
    """GradDot's, TRAK's and LoGRA's passes (and LoGRA's PCA) are kept per task too."""
    m = methods.get(name, task.kind)
    cfg = m.default_config(task.kind)
    cfg.update(chunk=8, **overrides)
    first, n_first = _fit_score(task, m, cfg)
    again, n_again = _fit_score(task, m, cfg)
    assert n_first > 0 and n_again == 0
    np.testing.assert_array_equal(again, first)
