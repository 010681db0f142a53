"""Shared tiny configs and fixtures: everything here runs in seconds on 2 CPU cores."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Set before jax loads. The suite runs in two worker processes: on a GPU build neither may
# grab most of the device memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The suite checks numbers, not speed, and is compile-bound: XLA's CPU backend without LLVM
# optimisation compiles faster (about 20% less CPU time for the suite; the tests' subprocesses
# inherit it). A run outside the tests keeps XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
# One persistent XLA compilation cache for the whole session (these processes and the tests'
# subprocesses, which inherit the environment): many tests compile the same tiny pipeline in
# fresh closures, and the cache turns those recompilations into lookups.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="stride-jax-test-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

from stride_jax.job.config import base_config  # noqa: E402


def tiny_config():
    """A digits run small enough for unit tests (~10 s end to end)."""
    c = base_config("classifier")
    c.data.update(n_train=120, n_query=16)
    c.model.update(hidden=(32,), steps=60)
    c.groundtruth.update(num_models=8, models_per_batch=4)
    c.stride.design.update(num_subsets=40, degree=3)
    # Unit tests exercise the Adam path of stage 1 (init "zero", 40 steps): checkpoints,
    # resume, sharding. The default Gauss-Newton start is covered by tests/test_newton.py,
    # the README snippet and the digits_quick CLI run (test_tune), which keep base_config's.
    c.stride.stage1.update(
        init="zero",
        rank=8,
        steps=40,
        log_every=10,
        ckpt_every=20,
        warmup_steps=5,
        subsets_per_step=0,
        fidelity_batch=4,
        stability_batch=32,
        probe_batch=8,
        sketch_dim=8,
    )
    c.stride.lasso.update(maxiter=200, path_len=4)
    c.lds.n_boot = 50
    return c


@pytest.fixture
def tiny():
    return tiny_config()


def tiny_decoder_task(
    block_len=16,
    n_train=40,
    n_query=4,
    model=None,
    recipe=None,
    fit=True,
):
    """(shakespeare splits, DecoderTask) on ``n_train`` blocks of ``block_len`` characters.
    Defaults: the tiny decoder of the LM tests, a 2-layer llama (d=16) trained 20 steps;
    ``model`` overrides DecoderConfig fields, ``recipe`` the training recipe's, and
    ``fit=False`` keeps the initial parameters."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from stride_jax.data import corpora
    from stride_jax.models import lm_train, transformer
    from stride_jax.tasks.decoder_task import DecoderTask

    sp = corpora.load_shakespeare(
        block_len=block_len, n_train=n_train, n_val=0, n_query=n_query, seed=0
    )
    fields = dict(family="llama", d_model=16, n_layers=2, n_heads=2, n_kv_heads=1) | (model or {})
    cfg = transformer.DecoderConfig(vocab_size=sp.tokenizer.vocab_size, max_len=block_len, **fields)
    gd, p0 = transformer.build(cfg, jax.random.key(0))
    steps = dict(steps=20, batch=8, lr=3e-3, warmup_steps=2, lr_end_frac=0.1, clip=1.0)
    recipe = ml_collections.ConfigDict(steps | dict(weight_decay=0.01) | (recipe or {}))
    params = p0
    if fit:
        params = lm_train.jitted_fit(recipe, gd)(
            p0, jax.random.key(0), lm_train.data_arrays(sp.train), jnp.ones(len(sp.train))
        )
    task = DecoderTask(
        graphdef=gd,
        params=params,
        train=sp.train,
        query=sp.query,
        model_config=cfg,
        recipe=recipe,
        params0=p0,
        tokenizer=sp.tokenizer,
    )
    return sp, task


def pytest_sessionfinish(session, exitstatus):
    """xdist stops a finished worker by interrupting it; an interrupt that lands inside jax's
    garbage-collection callback was printed as an unraisable-exception dump. The session is
    over, so that callback has nothing left to free: take it out first."""
    import gc

    gc.callbacks[:] = [c for c in gc.callbacks if getattr(c, "__name__", "") != "_xla_gc_callback"]
