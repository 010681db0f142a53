"""MNIST-5k loader: shapes, shuffled split (the file is sorted by label), determinism."""

import ml_collections
import numpy as np
import pytest

from stride_jax.data import DataError, load
from stride_jax.data.mnist5k import load_mnist5k


def test_shapes_labels_and_pixels():
    s = load_mnist5k()
    assert s.name == "mnist5k" and s.num_classes == 10 and s.val is None
    assert s.train.x_NxF.shape == (4500, 784) and s.query.x_NxF.shape == (500, 784)
    assert s.train.x_NxF.dtype == np.float32 and s.train.y_N.dtype == np.int32
    # The rows ship sorted by label: an unshuffled split would give the query set only 9s.
    assert set(np.unique(s.train.y_N)) == set(range(10))
    assert set(np.unique(s.query.y_N)) == set(range(10))
    assert np.bincount(s.query.y_N, minlength=10).min() >= 25
    for x in (s.train.x_NxF, s.query.x_NxF):
        assert x.min() == 0.0 and x.max() == 1.0
    assert len(np.unique(s.train.ids_N)) == 4500 and s.train.ids_N.max() < 5000


def test_deterministic_and_seeded():
    a, b, c = load_mnist5k(seed=3), load_mnist5k(seed=3), load_mnist5k(seed=4)
    np.testing.assert_array_equal(a.train.x_NxF, b.train.x_NxF)
    np.testing.assert_array_equal(a.query.y_N, b.query.y_N)
    np.testing.assert_array_equal(a.train.ids_N, b.train.ids_N)
    assert not np.array_equal(a.train.ids_N, c.train.ids_N)


def test_validation_split_and_errors():
    s = load_mnist5k(n_train=1000, n_query=200, n_val=300)
    assert len(s.train) == 1000 and len(s.query) == 200 and len(s.val) == 300
    ids = np.concatenate([s.train.ids_N, s.val.ids_N])
    assert len(np.unique(ids)) == 1300
    assert len(load_mnist5k(n_train=1000, n_query=200, n_val=None).val) == 3800
    with pytest.raises(DataError, match="exceeds"):
        load_mnist5k(n_train=4800, n_query=300)
    with pytest.raises(DataError, match="n_val"):
        load_mnist5k(n_train=4500, n_query=400, n_val=200)


def test_load_from_config():
    cfg = ml_collections.ConfigDict(
        dict(name="mnist5k", path="", seed=0, n_train=4000, n_query=500, query_split="val")
    )
    s = load(cfg)  # the rest (500) is the validation set, swapped in as the queries
    assert len(s.train) == 4000 and len(s.query) == 500 and s.val is None
    direct = load_mnist5k(0, 4000, 500)
    np.testing.assert_array_equal(s.train.x_NxF, direct.train.x_NxF)
