"""More devices change only the mesh: 8 fake CPU devices give the 1-device results.

Each check runs in a subprocess because XLA_FLAGS must be set before jax is imported. For
every mesh shape (data, ops) the script runs, on a tiny classifier (digits MLP) and a tiny
decoder (2-layer llama on Shakespeare blocks):

- stage 1, both recipes on the classifier and on the decoder (the decoder's Adam recipe only
  in the slow every-mesh test; Adam: gates over ``ops``;
  Gauss-Newton: the curvature's rows over ``data``, the solve's right-hand sides over ``ops``;
  on the decoder with its sampled Fisher and linear responses); compared: the trained gates;
  and the Gauss-Newton pieces alone (curvature, per-example and per-subset gradients, gates
  for T <= N and T > N) on rows spanning several chunks, so the chunks really split;
- responses (queries over ``data`` x operators over ``ops``), also for 5 queries on a (2, 3)
  mesh (queries and operators padded); the decoder's encode (rows over every device) feeds
  both its stage 1 and its responses;
- the Lasso (queries over ``data``): on the reference's own responses, so it is compared
  alone, and end to end (the scores of the run);
- retraining (models over every device): classifier parameters, decoder query losses.

Each is compared with the (1, 1) mesh: the same code on one device, the reference. The
differences are float32 rounding (a psum over devices, per-device scans and solves, another
vectorisation of the same loops). Stated tolerances, max abs difference over every mesh
shape (measured maximum over (8, 1), (1, 8), (2, 4) in brackets): stage-1 gates 3e-5 (4e-6,
Adam on the classifier; Gauss-Newton 2e-6), Gauss-Newton curvature and gradients 1e-6
(2e-8), responses 1e-5 (1e-6), the Lasso alone 1e-6 (8e-8), scores 3e-5 (2.5e-6),
retrains 1e-5 (5e-7).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from stride_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, sys, tempfile, time
T0 = time.time()
def tick(what):
    print(f"{time.time() - T0:6.1f}s {what}", file=sys.stderr)
import jax, jax.numpy as jnp, ml_collections, numpy as np
sys.path.insert(0, "tests")
from conftest import tiny_config
from stride_jax import sharding
from stride_jax.data import corpora, load
from stride_jax.eval import groundtruth
from stride_jax.job import models
from stride_jax.models import lm_train, transformer
from stride_jax.stride import defaults, method, newton, recover
from stride_jax.tasks.decoder_task import DecoderTask, retrain_losses
from test_newton import _setup

SHAPES = json.loads(sys.argv[1])
FULL = sys.argv[2] == "full"  # also the decoder's Adam recipe (the paper's; not its default)
assert len(jax.devices()) == 8, jax.devices()


def leaves(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)]).tolist()


def stride_run(task, cfg, query, mesh):
    fitted = method.fit(task, cfg, reuse=False)
    out = method.attribute_rows(task, fitted, query, cfg)
    # Queries and operators that do not fill the mesh: 5 queries, T over 3 ops devices.
    odd = sharding.make_mesh(1, 1) if mesh.size == 1 else sharding.make_mesh(2, 3)
    padded = method.responses(fitted, query.subset(np.arange(5)), odd)
    return fitted, {
        "gates": leaves(fitted.params), "responses": out.responses_QxT.tolist(),
        "scores": out.scores_QxN.tolist(), "responses_padded": padded.tolist(),
    }


def newton_rows(mesh):
    # The Gauss-Newton pieces on rows that span several chunks of 16 (so that the chunks
    # really split over data): an MLP's hidden + logit sites, T <= N and T > N.
    out = {}
    ops, inputs, cfg = _setup(True, n=80, t=8)
    for per_subset in (False, True):
        h, g = jax.jit(lambda: newton.curvature_and_gradients(
            ops, inputs, 16, per_subset, mesh=mesh))()
        out |= {"curvature": np.asarray(h).ravel().tolist(),
                f"gradients_{per_subset}": np.asarray(g).ravel().tolist()}
    defaults_ = newton.curvature_and_gradients.__defaults__
    newton.curvature_and_gradients.__defaults__ = (16, False)
    for name, (ops, inputs, cfg) in (
        ("gates", (ops, inputs, cfg)), ("gates_T>N", _setup(False, n=24, t=40, deg=2))
    ):
        out[name] = leaves(jax.jit(lambda: newton.newton_gates(ops, inputs, cfg, mesh))())
    newton.curvature_and_gradients.__defaults__ = defaults_
    return out


def lasso_alone(fitted, y_QxT, cfg, mesh):
    out = recover.lasso_scores(
        fitted.design, method.lasso_targets(y_QxT, fitted.design, cfg),
        recover.LassoConfig(**cfg.lasso.to_dict()), key=method._keys(cfg)[2], mesh=mesh)
    return np.asarray(out["scores_QxN"]).tolist()


config = tiny_config()
config.stride.stage1.update(steps=20, ckpt_every=20)
config.stride.lasso.update(maxiter=50)
newton_cfg = config.stride.copy_and_resolve_references()
newton_cfg.stage1.update(defaults.NEWTON_RECIPE)
splits = load(config.data)

sp = corpora.load_shakespeare(block_len=16, n_train=40, n_val=0, n_query=8, seed=0)
lm_cfg = transformer.DecoderConfig(family="llama", vocab_size=sp.tokenizer.vocab_size,
    d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_len=16)
gd, p0 = transformer.build(lm_cfg, jax.random.key(0))
recipe = ml_collections.ConfigDict(dict(
    steps=10, batch=8, lr=3e-3, warmup_steps=2, lr_end_frac=0.1, clip=1.0, weight_decay=0.01))
lm_params = lm_train.jitted_fit(recipe, gd)(
    p0, jax.random.key(0), lm_train.data_arrays(sp.train), jnp.ones(len(sp.train)))
dec_cfg = defaults.decoder_adam()
dec_cfg.design.update(num_subsets=16, degree=2)
dec_cfg.stage1.update(steps=5, log_every=5, ckpt_every=5, subsets_per_step=8, sketch_dim=4,
    rank=4, top_k=4, warmup_steps=2, lr=0.05)
dec_cfg.lasso.update(maxiter=50)
dec_newton = defaults.decoder_residual()  # Gauss-Newton on the residual: sampled Fisher, linear
dec_newton.design.update(num_subsets=16, degree=2)
dec_newton.stage1.update(sketch_dim=4, rank=4, top_k=4, fisher_samples=2)
dec_newton.lasso.update(maxiter=50)

ref_y = {}
results = {}
for shape in SHAPES:
    mesh = sharding.make_mesh(*shape)
    tick(f"start {shape}")
    res = {"newton_rows": newton_rows(mesh)}
    tick("newton rows")
    with tempfile.TemporaryDirectory() as d:
        task, *_ = models.base_task(config, splits, mesh, d)
        for name, cfg in (("adam", config.stride), ("newton", newton_cfg)):
            fitted, res[name] = stride_run(task, cfg, splits.query, mesh)
            y = ref_y.setdefault(name, np.asarray(res[name]["responses"], np.float32))
            res[name]["lasso"] = lasso_alone(fitted, y, cfg, mesh)
            tick(name)
        gt = groundtruth.retrain_many(
            config.model, jax.random.split(jax.random.key(0), 8),
            jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N),
            np.random.default_rng(0).random((8, len(splits.train))) < 0.5,
            splits.num_classes, mesh, batch=8)
        res["adam"]["retrain"] = leaves(gt)
        tick("classifier retrain")
    task = DecoderTask(graphdef=gd, params=lm_params, train=sp.train, query=sp.query,
        mesh=mesh, model_config=lm_cfg, recipe=recipe, params0=p0, tokenizer=sp.tokenizer)
    recipes = [("decoder", dec_cfg)] if FULL else []
    for name, cfg in recipes + [("decoder_newton", dec_newton)]:
        fitted, res[name] = stride_run(task, cfg, sp.query, mesh)
        y = ref_y.setdefault(name, np.asarray(res[name]["responses"], np.float32))
        res[name]["lasso"] = lasso_alone(fitted, y, cfg, mesh)
        tick(name)
    masks = np.random.default_rng(1).random((3, len(sp.train))) < 0.5
    res["decoder_newton"]["retrain"] = retrain_losses(
        task, jax.random.split(jax.random.key(3), 3), masks.astype(np.float32),
        task.data(sp.query), group=3).tolist()
    tick("decoder retrain")
    results[str(tuple(shape))] = res
print(json.dumps(results))
"""

# Max abs difference from the 1-device run, per quantity (see the module docstring).
TOL = {"gates": 3e-5, "gates_T>N": 3e-5, "responses": 1e-5, "responses_padded": 1e-5}
TOL |= {"retrain": 1e-5, "scores": 3e-5}
TOL |= {"lasso": 1e-6, "curvature": 1e-6, "gradients_False": 1e-6, "gradients_True": 1e-6}


def _run_on_eight_devices(shapes, full=False):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(shapes), "full" if full else "default"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_differences(results) -> dict:
    """{mesh shape: {task: {quantity: max abs difference from the (1, 1) mesh}}}."""
    ref = results["(1, 1)"]
    return {
        shape: {
            task: {k: float(np.abs(np.subtract(v, ref[task][k])).max()) for k, v in q.items()}
            for task, q in res.items()
        }
        for shape, res in results.items()
    }


def _check(results):
    for shape, res in max_differences(results).items():
        for task, quantities in res.items():
            for key, diff in quantities.items():
                assert diff <= TOL[key], f"mesh {shape}, {task}: {key} differs by {diff:.3g}"


def test_eight_fake_devices_match_one_device():
    """Both mesh axes at once: (data, ops) = (2, 4); the decoder with its Gauss-Newton recipe
    only (the slow test below adds the Adam recipe, whose gates shard over ``ops``, on every
    mesh shape; the classifier's Adam recipe runs here)."""
    _check(_run_on_eight_devices([[1, 1], [2, 4]]))


@pytest.mark.slow
def test_eight_fake_devices_match_one_device_on_every_mesh_shape():
    """All devices on one axis, then the other, then both."""
    _check(_run_on_eight_devices([[1, 1], [8, 1], [1, 8], [2, 4]], full=True))


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs more than"):
        sharding.make_mesh(data=64, ops=64)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(-1, -1)
