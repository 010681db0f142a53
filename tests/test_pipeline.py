"""attribute(): the public entry point, used directly from JAX code."""

import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax import attribute, checkpoint, load_digits
from stride_jax.config import ConfigError
from stride_jax.operators import LogitHook


def _linear_hook(num_features=64, num_classes=10):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(num_features, num_classes)) * 0.1)
    return LogitHook(lambda x: jnp.tanh(x), lambda x: x @ w)


def test_workdir_of_another_config_is_refused(tiny, tmp_path):
    splits = load_digits(n_train=60, n_query=5)
    out = attribute(_linear_hook(), splits.train, splits.query, tiny.stride, workdir=str(tmp_path))
    assert out.scores_QxN.shape == (5, 60) and out.responses_QxT.shape == (5, 40)
    again = attribute(
        _linear_hook(), splits.train, splits.query, tiny.stride, workdir=str(tmp_path)
    )
    np.testing.assert_array_equal(out.scores_QxN, again.scores_QxN)  # resumed: same scores
    tiny.stride.stage1.lr = 0.5
    with pytest.raises(checkpoint.CheckpointError, match="different config"):
        attribute(_linear_hook(), splits.train, splits.query, tiny.stride, workdir=str(tmp_path))


def test_design_with_empty_subsets_is_a_config_error(tiny):
    splits = load_digits(n_train=30, n_query=2)
    tiny.stride.design.update(num_subsets=40, degree=1)  # 30 examples cannot fill 40 subsets
    with pytest.raises(ConfigError, match="subsets are empty"):
        attribute(_linear_hook(), splits.train, splits.query, tiny.stride)
