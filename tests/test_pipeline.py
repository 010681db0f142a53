"""STRIDE through the public API on a user model: workdir resume and guards, bad designs."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stride_jax
from stride_jax.errors import ConfigError
from stride_jax.stride import method


def _linear_task(n_train, n_query, workdir=None):
    """A fixed random linear classifier (tanh features) on digits: no training needed."""

    class Linear(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.random.default_rng(0).normal(size=(64, 10)) * 0.1)

        def features(self, x):
            return jnp.tanh(x)

        def __call__(self, x):
            return x @ self.w[...]

    splits = stride_jax.load_digits(n_train=n_train, n_query=n_query)
    task = stride_jax.tasks.classifier(
        Linear(), train=splits.train, queries=splits.query, num_classes=10
    )
    return dataclasses.replace(task, workdir=workdir)


def test_workdir_of_another_config_is_retrained(tiny, tmp_path):
    task = _linear_task(60, 5, str(tmp_path))
    out = method.attribute_rows(
        task, method.fit(task, tiny.stride, reuse=False), task.query, tiny.stride
    )
    assert out.scores_QxN.shape == (5, 60) and out.responses_QxT.shape == (5, 40)
    again = method.attribute_rows(
        task, method.fit(task, tiny.stride, reuse=False), task.query, tiny.stride
    )
    np.testing.assert_array_equal(out.scores_QxN, again.scores_QxN)  # resumed: same scores
    tiny.stride.stage1.lr = 0.5  # another stage-1 setting: retrained, not served the old gates
    other = method.attribute_rows(
        task, method.fit(task, tiny.stride, reuse=False), task.query, tiny.stride
    )
    assert not np.array_equal(out.scores_QxN, other.scores_QxN)
    with open(os.path.join(task.workdir, "stride.config.json")) as f:
        assert json.load(f)["stage1"]["lr"] == 0.5


def test_design_with_empty_subsets_is_a_config_error(tiny):
    task = _linear_task(30, 2)
    tiny.stride.design.update(num_subsets=40, degree=1)  # 30 examples cannot fill 40 subsets
    with pytest.raises(ConfigError, match=r"num_subsets=40 is more than .* \(10 subsets would"):
        stride_jax.attribute(task, config=tiny.stride)
    # 0 (the default) is the automatic T = min(3000, N*d // 2) = 15 here: no subset is empty.
    tiny.stride.design.num_subsets = 0
    fitted = method.fit(task, tiny.stride, reuse=False)
    assert fitted.design.num_subsets == 15 and fitted.design.sizes_T.min() == 2
