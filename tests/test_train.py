"""Stage 1: the optimizer split, learning progress, and exact resume after interruption."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from stride_jax import checkpoint, sharding, subsets, train
from stride_jax.operators import SteeringOperators


def _inputs(n=60, d=10, c=4, t=20, deg=3, sketch=4, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)).astype(np.float32)
    logits = rng.normal(size=(n, c)).astype(np.float32)
    y = rng.integers(0, c, n).astype(np.int32)
    design = subsets.expander(jax.random.key(seed), t, n, deg)
    cfg = ml_collections.ConfigDict(dict(sketch="gaussian", sketch_dim=sketch))
    return train.make_inputs({"h": h, "logits": logits}, y, design, cfg, jax.random.key(1))


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
    tx = train.make_optimizer(cfg)
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


def test_stage1_lowers_fidelity_and_stays_stable(tiny):
    cfg = tiny.stride.stage1
    with cfg.unlocked():
        cfg.steps, cfg.log_every = 100, 10
    _, params, hist = train.fit_operators(_inputs(), cfg, jax.random.key(0), sharding.make_mesh())
    assert hist[-1]["fidelity"] < 0.8 * hist[0]["fidelity"]
    assert hist[-1]["stability"] < 0.5
    assert float(jnp.abs(params["gates"][...]).max()) > 0


def test_resume_after_interruption_is_exact(tiny, tmp_path, monkeypatch):
    cfg = tiny.stride.stage1
    inputs, mesh, key = _inputs(), sharding.make_mesh(), jax.random.key(0)
    _, straight, _ = train.fit_operators(inputs, cfg, key, mesh, str(tmp_path / "a"))

    original = checkpoint.TrainCheckpoints.save

    def save_then_die(self, step, state):
        original(self, step, state)
        raise KeyboardInterrupt(f"killed after step {step}")

    monkeypatch.setattr(checkpoint.TrainCheckpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt, match="step 20"):
        train.fit_operators(inputs, cfg, key, mesh, str(tmp_path / "b"))
    monkeypatch.setattr(checkpoint.TrainCheckpoints, "save", original)
    _, resumed, hist = train.fit_operators(inputs, cfg, key, mesh, str(tmp_path / "b"))
    assert hist[0]["step"] == 30  # picked up after the step-20 checkpoint
    for a, b in zip(_params_np(straight), _params_np(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mismatched_checkpoint_is_refused(tiny, tmp_path):
    cfg = tiny.stride.stage1
    mesh = sharding.make_mesh()
    train.fit_operators(_inputs(t=20), cfg, jax.random.key(0), mesh, str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        train.fit_operators(_inputs(t=24), cfg, jax.random.key(0), mesh, str(tmp_path))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"subsets_per_step": 50}, "exceeds T"),
        ({"sketch_dim": 16}, "sketch_dim"),
        ({"steps": 35}, "multiple of log_every"),
    ],
)
def test_bad_stage1_config(tiny, change, match):
    cfg = tiny.stride.stage1
    cfg.update(change)
    with pytest.raises(ValueError, match=match):
        train.fit_operators(_inputs(), cfg, jax.random.key(0), sharding.make_mesh())
