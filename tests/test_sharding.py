"""More devices change only the mesh: 4 fake CPU devices give the 1-device scores.

Runs in a subprocess because XLA_FLAGS must be set before jax is imported.
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
import json, sys, tempfile
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
from conftest import tiny_config
from stride_jax import sharding
from stride_jax.eval import groundtruth
from stride_jax.stride import method
from stride_jax.job import models
from stride_jax.data import load

assert len(jax.devices()) == 4, jax.devices()
config = tiny_config()
config.stride.stage1.update(steps=20, ckpt_every=20)
config.stride.lasso.update(maxiter=50)
splits = load(config.data)
results = {}
for shape in [(1, 1), (2, 2), (1, 4)]:  # (data, ops): both axes, ops alone
    mesh = sharding.make_mesh(*shape)
    with tempfile.TemporaryDirectory() as d:
        task, *_ = models.base_task(config, splits, mesh, d)
        fitted = method.fit(task, config.stride, reuse=False)
        out = method.attribute_rows(task, fitted, splits.query, config.stride)
        gt = groundtruth.retrain_many(
            config.model, jax.random.split(jax.random.key(0), 4), jnp.asarray(splits.train.x_NxF),
            jnp.asarray(splits.train.y_N), np.ones((4, len(splits.train)), bool),
            splits.num_classes, mesh, batch=2)
    results[str(shape)] = {
        "scores": out.scores_QxN.tolist(), "responses": out.responses_QxT.tolist(),
        "retrain": np.asarray(jax.tree_util.tree_leaves(gt)[0]).tolist(),
    }
print(json.dumps(results))
"""


def test_four_fake_devices_match_one_device():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results["(1, 1)"]
    for shape, res in results.items():
        for key in ("responses", "retrain"):
            np.testing.assert_allclose(res[key], ref[key], atol=1e-5, err_msg=f"{shape} {key}")
        np.testing.assert_allclose(res["scores"], ref["scores"], atol=1e-4, err_msg=shape)


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs more than"):
        sharding.make_mesh(data=64, ops=64)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(-1, -1)
