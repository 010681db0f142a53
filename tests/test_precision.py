"""``stride.compute_dtype``: bfloat16 responses rank the training rows as float32 ones do, and
the default runs exactly the code a config without the key runs (stride/precision.py)."""

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config, tiny_decoder_task
from scipy.stats import spearmanr

from stride_jax.errors import ConfigError
from stride_jax.job import benchmark
from stride_jax.models import transformer
from stride_jax.stride import classifier_inputs, defaults, method, residual, sites, subsets


def _without_dtype(cfg):
    """``cfg`` as it was before the option existed."""
    d = cfg.to_dict()
    d.pop("compute_dtype")
    return ml_collections.ConfigDict(d)


def _rank_agreement(scores_a, scores_b) -> list[float]:
    """Spearman correlation of each query's score rows; queries scored all zero by both runs
    (an empty Lasso support) are left out."""
    keep = [q for q in range(len(scores_a)) if scores_a[q].any() or scores_b[q].any()]
    return [spearmanr(scores_a[q], scores_b[q])[0] for q in keep]


def _check(task, query, cfg, against_absent: bool = True):
    """Spearman per query of float32 against bfloat16 responses of the same operators (stage 1
    is float32 whatever the option says: one fit); with ``against_absent``, also that the
    float32 run equals, bit for bit, a run whose config lacks the key."""
    cfg = cfg.copy_and_resolve_references()
    assert cfg.compute_dtype == "float32"
    fitted = method.fit(task, cfg, reuse=False)
    fp32 = method.attribute_rows(task, fitted, query, cfg)
    if against_absent:
        old = _without_dtype(cfg)
        absent = method.attribute_rows(task, method.fit(task, old, reuse=False), query, old)
        np.testing.assert_array_equal(fp32.responses_QxT, absent.responses_QxT)
        np.testing.assert_array_equal(fp32.scores_QxN, absent.scores_QxN)
    low_cfg = cfg.copy_and_resolve_references()
    low_cfg.compute_dtype = "bfloat16"
    low_fit = dataclasses.replace(fitted, site=task.site(low_cfg), last_responses=())
    low = method.attribute_rows(task, low_fit, query, low_cfg)
    assert not np.array_equal(low.responses_QxT, fp32.responses_QxT)  # it did run in bf16
    return _rank_agreement(fp32.scores_QxN, low.scores_QxN)


def test_classifier_bf16_scores_rank_like_fp32():
    """The tiny digits config (Adam stage 1) and the classifier default (Gauss-Newton): all 16
    queries compared in each (none has an all-zero row); minimum Spearman 1.00000 and
    0.99999 when written (float32 vs bfloat16 responses of the same operators)."""
    c = tiny_config()
    ctx = benchmark.prepare(c, tempfile.mkdtemp())
    newton = defaults.classifier()
    newton.design.update(num_subsets=40, degree=3)
    newton.stage1.update(rank=8, sketch_dim=8)
    for cfg, against_absent in ((c.stride, True), (newton, False)):
        rho = _check(ctx.task, ctx.splits.query, cfg, against_absent)
        assert len(rho) == len(ctx.splits.query)
        assert min(rho) >= 0.99, rho


def test_decoder_bf16_scores_rank_like_fp32():
    """The tiny decoder (test_lm_stride's): all 4 queries compared; minimum Spearman 1.00000
    when written."""
    sp, task = tiny_decoder_task()
    cfg = defaults.decoder_adam()  # the forward responses are what bfloat16 changes
    cfg.design.update(num_subsets=16, degree=2)
    cfg.stage1.update(steps=20, log_every=10, ckpt_every=10, subsets_per_step=8, sketch_dim=4)
    cfg.stage1.update(rank=4, top_k=4, warmup_steps=2, lr=0.05)
    rho = _check(task, sp.query, cfg)
    assert len(rho) == len(sp.query)
    assert min(rho) >= 0.99, rho


@pytest.mark.parametrize("kind", ["classifier", "decoder"])
def test_unknown_compute_dtype_is_refused(kind):
    cfg = defaults.default(kind)
    cfg.compute_dtype = "float16"
    make_site = sites.classifier_site if kind == "classifier" else sites.decoder_site
    with pytest.raises(ConfigError, match="compute_dtype must be one of"):
        make_site(None, cfg)  # before the task is read


def test_remat_keeps_the_stage1_gradient():
    """``stride.remat`` checkpoints the blocks above the hook: same loss gradient."""
    mc = transformer.DecoderConfig(
        family="llama", vocab_size=32, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, max_len=8
    )
    gd, params = transformer.build(mc, jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (3, 8, 16))
    tok = jax.random.randint(jax.random.key(2), (3, 8), 0, 32)
    attn = jnp.ones((3, 8), jnp.int32)

    def grad(remat):
        upper = residual.Upper(gd, 1, 8, remat=remat)
        return jax.grad(lambda h: upper.row_losses(params, h, attn, tok, attn).sum())(h)

    np.testing.assert_allclose(grad(True), grad(False), rtol=1e-5, atol=1e-7)


def test_stage1_chunk_donates_the_state(tiny):
    """The train chunk reuses the state's buffers (a caller must not read the state it passed
    in), without a donation warning."""
    import warnings

    from stride_jax import sharding
    from stride_jax.stride import stage1
    from stride_jax.stride.operators import SteeringOperators

    cfg = tiny.stride.stage1
    n, d, c = 30, 6, 3
    rng = np.random.default_rng(0)
    cache = {"h": rng.normal(size=(n, d)), "logits": rng.normal(size=(n, c))}
    design = subsets.expander(jax.random.key(0), 10, n, 2)
    inputs = classifier_inputs.make_inputs(
        {k: v.astype(np.float32) for k, v in cache.items()},
        rng.integers(0, c, n).astype(np.int32),
        design,
        cfg,
        jax.random.key(1),
    )
    mesh = sharding.make_mesh()
    tx = stage1.make_optimizer(cfg)
    ops = SteeringOperators.for_config(jax.random.key(2), d, c, 10, cfg)
    graphdef, state = stage1.init_state(ops, tx)
    shardings = stage1.state_shardings(state, mesh, 10)
    state = jax.device_put(state, shardings)
    chunk = stage1.build_train_chunk(graphdef, tx, inputs, cfg, mesh, shardings)
    before = state["params"]["gates"][...]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new, _ = chunk(state, jax.random.key(3))
    assert int(new["step"]) == cfg.log_every
    assert before.is_deleted()
