"""Every registered method runs through the job on tiny data (the quick variants)."""

import numpy as np

from stride_jax import methods
from stride_jax.job import benchmark


def test_every_method_runs_end_to_end(tiny, tmp_path):
    tiny.methods = tuple(methods.names("classifier"))
    tiny.baselines.trak.update(num_models=2, proj_dim=64)
    tiny.baselines.trak1.proj_dim = 64
    tiny.baselines.datamodel.update(num_models=8, models_per_batch=4)
    results = benchmark.run(tiny, str(tmp_path))
    assert set(results["methods"]) == set(tiny.methods)
    for name, entry in results["methods"].items():
        assert np.isfinite(entry["lds"]), name
        assert set(entry["seconds_split"]) == {"fit", "score"}, name
        assert entry["peak_mb"] >= 0, name
        scores = np.load(tmp_path / f"scores_{name}.npy")
        assert scores.shape == (16, 120) and np.isfinite(scores).all(), name
    assert -1 <= results["noise_ceiling"]["lds"] <= 1
    assert (tmp_path / "lds.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert all(name in table for name in results["methods"])


def test_stride_hidden_hook_runs_and_matches_a_response_loop(tiny, tmp_path):
    """STRIDE with hook="hidden" through the method interface; its responses equal a loop
    over operators of CE(base) - CE(operator k) computed from steered_logits one at a time."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from stride_jax.stride import method

    tiny.stride.update(hook="hidden", hidden_rank=4)
    tiny.methods = ("stride",)
    ctx, _ = benchmark.context(tiny, str(tmp_path))
    task = ctx.task
    fitted = method.fit(task, tiny.stride, reuse=False)
    out = method.attribute_rows(task, fitted, ctx.splits.query, tiny.stride)
    hook = fitted.site.hook
    assert out.scores_QxN.shape == (16, 120) and np.isfinite(out.scores_QxN).all()
    ops = nnx.merge(fitted.graphdef, fitted.params)
    cache = hook.encode(jnp.asarray(ctx.splits.query.x_NxF))
    y = jnp.asarray(ctx.splits.query.y_N)
    ce = optax.softmax_cross_entropy_with_integer_labels
    for k in (0, 7, 39):
        logits = ops.steered_logits(cache, jnp.array([k]), True, hook.fixed)[0]
        want = ce(cache["logits"], y) - ce(logits, y)
        np.testing.assert_allclose(out.responses_QxT[:, k], want, rtol=1e-4, atol=1e-6)
    assert np.abs(out.responses_QxT).max() > 0
