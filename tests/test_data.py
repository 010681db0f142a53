"""Data loaders: embedded digits, user .npz files and their validation errors."""

import numpy as np
import pytest
from ml_collections import ConfigDict
from sklearn.datasets import load_digits as sk_load_digits

from stride_jax.data import DataError, load, load_digits, load_npz, make_splits

F = 5


def good_arrays(n_train=12, n_query=4, seed=0):
    rng = np.random.default_rng(seed)
    y_train = np.arange(n_train) % 3
    return {
        "x_train": rng.normal(size=(n_train, F)).astype(np.float32),
        "y_train": y_train.astype(np.int64),
        "x_query": rng.normal(size=(n_query, F)).astype(np.float32),
        "y_query": (np.arange(n_query) % 3).astype(np.int64),
    }


@pytest.fixture(scope="module")
def sk_digits():
    x, y = sk_load_digits(return_X_y=True)
    return x / 16.0, y


def test_load_digits_default_sizes_and_ranges(sk_digits):
    s = load_digits()
    assert s.name == "digits"
    assert (len(s.train), len(s.query), len(s.val)) == (1400, 200, 197)
    assert s.num_classes == 10
    for ds in (s.train, s.query, s.val):
        assert ds.x_NxF.shape == (len(ds), 64) and ds.x_NxF.dtype == np.float32
        assert ds.y_N.dtype == np.int32
        assert ds.x_NxF.min() >= 0.0 and ds.x_NxF.max() <= 1.0
        assert set(np.unique(ds.y_N).tolist()) <= set(range(10))
    assert set(np.unique(s.train.y_N).tolist()) == set(range(10))

    # Train and val ids index the original 1,797 images: rows and labels match sklearn's.
    x, y = sk_digits
    for ds in (s.train, s.val):
        np.testing.assert_allclose(ds.x_NxF, x[ds.ids_N], atol=1e-7)
        np.testing.assert_array_equal(ds.y_N, y[ds.ids_N])
    assert len(set(s.train.ids_N.tolist())) == 1400
    assert set(s.train.ids_N.tolist()).isdisjoint(s.val.ids_N.tolist())

    # Query ids are positional (0..n_query-1); find the query rows' source images instead
    # and check that the three splits together are a partition of the 1,797 images.
    key = {row.tobytes(): i for i, row in enumerate(x.astype(np.float32))}
    q_src = [key[row.tobytes()] for row in s.query.x_NxF]
    np.testing.assert_array_equal(s.query.y_N, y[q_src])
    np.testing.assert_array_equal(s.query.ids_N, np.arange(200))
    used = set(s.train.ids_N.tolist()) | set(s.val.ids_N.tolist())
    # digits has a few duplicate images; a query row matching a train/val image must be a copy.
    for row, i in zip(s.query.x_NxF, q_src, strict=True):
        if i in used:
            dups = np.flatnonzero(np.all(x.astype(np.float32) == row, axis=1))
            assert len(dups) > 1
    n_images = len(y)
    assert len(s.train) + len(s.query) + len(s.val) == n_images


def test_load_digits_deterministic_and_seeded():
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    np.testing.assert_array_equal(a.train.ids_N, b.train.ids_N)
    np.testing.assert_array_equal(a.train.x_NxF, b.train.x_NxF)
    np.testing.assert_array_equal(a.query.x_NxF, b.query.x_NxF)
    np.testing.assert_array_equal(a.val.ids_N, b.val.ids_N)
    assert not np.array_equal(a.train.ids_N, c.train.ids_N)


def test_load_digits_custom_sizes_and_too_many():
    s = load_digits(seed=0, n_train=100, n_query=20)
    assert (len(s.train), len(s.query), len(s.val)) == (100, 20, 1677)
    s2 = load_digits(seed=0, n_train=1700, n_query=97)
    assert s2.val is None
    with pytest.raises(DataError, match=r"n_train \+ n_query = 1798 exceeds the 1797 digits"):
        load_digits(seed=0, n_train=1700, n_query=98)


@pytest.mark.parametrize("with_ids", [False, True])
def test_load_npz_happy_path(tmp_path, with_ids):
    arrs = good_arrays()
    if with_ids:
        arrs["ids_train"] = np.arange(100, 112)
    path = tmp_path / "mydata.npz"
    np.savez(path, **arrs)
    s = load_npz(str(path))
    assert s.name == "mydata"
    assert s.num_classes == 3
    assert s.val is None
    np.testing.assert_array_equal(s.train.x_NxF, arrs["x_train"])
    np.testing.assert_array_equal(s.train.y_N, arrs["y_train"])
    np.testing.assert_array_equal(s.query.x_NxF, arrs["x_query"])
    np.testing.assert_array_equal(s.query.y_N, arrs["y_query"])
    assert s.train.x_NxF.dtype == np.float32 and s.train.y_N.dtype == np.int32
    expected_ids = np.arange(100, 112) if with_ids else np.arange(12)
    np.testing.assert_array_equal(s.train.ids_N, expected_ids)
    np.testing.assert_array_equal(s.query.ids_N, np.arange(4))


def test_load_npz_accepts_integer_features_and_integral_float_labels(tmp_path):
    arrs = good_arrays()
    arrs["x_train"] = np.arange(12 * F).reshape(12, F)
    arrs["x_query"] = np.ones((4, F), np.int16)
    arrs["y_train"] = arrs["y_train"].astype(np.float64)
    path = tmp_path / "ints.npz"
    np.savez(path, **arrs)
    s = load_npz(str(path))
    assert s.train.x_NxF.dtype == np.float32
    np.testing.assert_array_equal(s.train.x_NxF, np.arange(12 * F).reshape(12, F))
    np.testing.assert_array_equal(s.train.y_N, np.arange(12) % 3)


def test_load_npz_missing_file(tmp_path):
    path = str(tmp_path / "nope.npz")
    with pytest.raises(DataError, match=r"nope\.npz.*does not exist"):
        load_npz(path)


@pytest.mark.parametrize(
    "content", [b"this is not a zip file at all" * 10, b"", b"PK\x03\x04garbage"]
)
def test_load_npz_not_an_npz(tmp_path, content):
    path = tmp_path / "garbage.npz"
    path.write_bytes(content)
    # A text file or an empty one is named as not an .npz (never "allow_pickle="); a broken
    # zip is reported as unreadable.
    with pytest.raises(DataError, match=r"garbage\.npz.* (is not|as) an \.npz archive") as e:
        load_npz(str(path))
    assert "pickle" not in str(e.value)


def test_load_npz_plain_npy_is_rejected(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match=r"single\.npz.* is a single \.npy array"):
        load_npz(str(path))


def test_load_npz_object_arrays_are_named_not_unpickled(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1))
    with pytest.raises(DataError, match=r"array 'x_train' .* holds Python objects") as e:
        load_npz(str(path))
    assert "allow_pickle" not in str(e.value)


def _mutate(arrs, key, value):
    arrs = dict(arrs)
    if value is None:
        del arrs[key]
    else:
        arrs[key] = value
    return arrs


def _bad_cases():
    g = good_arrays()
    nan_q = g["x_query"].copy()
    nan_q[1, 2] = np.nan
    inf_t = g["x_train"].copy()
    inf_t[0, 0] = np.inf
    return [
        ("missing_y_query", _mutate(g, "y_query", None), r"missing array\(s\) y_query"),
        (
            "missing_two",
            _mutate(_mutate(g, "x_train", None), "y_train", None),
            r"missing array\(s\) x_train, y_train",
        ),
        ("unknown_extra", _mutate(g, "weights", np.ones(12)), r"unknown array\(s\) weights"),
        ("x_train_1d", _mutate(g, "x_train", np.ones(12)), r"x_train must be 2-D.*\(12,\)"),
        ("x_query_3d", _mutate(g, "x_query", np.ones((4, F, 2))), r"x_query must be 2-D"),
        ("x_train_empty", _mutate(g, "x_train", np.ones((0, F))), r"x_train is empty"),
        ("x_train_no_features", _mutate(g, "x_train", np.ones((12, 0))), r"x_train has 0 feat"),
        ("nan_x_query", _mutate(g, "x_query", nan_q), r"x_query contains NaN or inf"),
        ("inf_x_train", _mutate(g, "x_train", inf_t), r"x_train contains NaN or inf"),
        (
            "y_train_len",
            _mutate(g, "y_train", np.arange(11) % 3),
            r"y_train has 11 labels but its features have 12 rows",
        ),
        ("y_query_2d", _mutate(g, "y_query", np.zeros((4, 1), int)), r"y_query must be 1-D"),
        (
            "y_train_nonint_float",
            _mutate(g, "y_train", (np.arange(12) % 3) + 0.5),
            r"y_train must hold integer class labels, got non-integer floats",
        ),
        (
            "y_train_nan",
            _mutate(g, "y_train", np.where(np.arange(12) == 3, np.nan, np.arange(12) % 3)),
            r"y_train contains NaN or inf",
        ),
        (
            "y_train_negative",
            _mutate(g, "y_train", (np.arange(12) % 3) - 1),
            r"y_train has negative labels \(min -1\)",
        ),
        (
            "y_query_negative",
            _mutate(g, "y_query", np.array([0, 1, -2, 0])),
            r"y_query has negative labels \(min -2\)",
        ),
        (
            "y_query_too_large",
            _mutate(g, "y_query", np.array([0, 1, 3, 0])),
            r"y_query has label 3 but y_train only has labels 0\.\.2",
        ),
        (
            "single_class",
            _mutate(g, "y_train", np.zeros(12, int)),
            r"y_train has a single class",
        ),
        (
            "feature_mismatch",
            _mutate(g, "x_query", np.ones((4, F + 1), np.float32)),
            rf"x_query has {F + 1} features but x_train has {F}",
        ),
        (
            "ids_wrong_shape",
            _mutate(g, "ids_train", np.arange(11)),
            r"ids_train has shape \(11,\), expected \(12,\)",
        ),
        (
            "ids_2d",
            _mutate(g, "ids_train", np.arange(12).reshape(12, 1)),
            r"ids_train has shape \(12, 1\), expected \(12,\)",
        ),
        (
            "ids_duplicate",
            _mutate(g, "ids_train", np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10])),
            r"ids_train has duplicate ids",
        ),
        (
            "x_train_strings",
            _mutate(g, "x_train", np.full((12, F), "a")),
            r"x_train must be numeric, got dtype <U1",
        ),
        (
            "x_query_bool",
            _mutate(g, "x_query", np.ones((4, F), bool)),
            r"x_query must be numeric, got dtype bool",
        ),
        (
            "y_train_strings",
            _mutate(g, "y_train", np.array(list("abcabcabcabc"))),
            r"y_train must hold integer class labels, got dtype <U1",
        ),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("arrays,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_load_npz_errors(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match):
        load_npz(str(path))


@pytest.mark.parametrize(
    "arrays,match",
    [c[1:] for c in BAD if not c[0].startswith(("missing", "unknown"))],
    ids=[c[0] for c in BAD if not c[0].startswith(("missing", "unknown"))],
)
def test_make_splits_errors(arrays, match):
    arrays = dict(arrays)
    ids = arrays.pop("ids_train", None)
    with pytest.raises(DataError, match=match):
        make_splits(
            "t", arrays["x_train"], arrays["y_train"], arrays["x_query"], arrays["y_query"], ids
        )


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_load_from_config_digits_and_path(tmp_path):
    cfg = ConfigDict({"name": "digits", "path": "", "seed": 0, "n_train": 100, "n_query": 20})
    s = load(cfg)
    ref = load_digits(seed=0, n_train=100, n_query=20)
    assert (len(s.train), len(s.query)) == (100, 20)
    np.testing.assert_array_equal(s.train.ids_N, ref.train.ids_N)
    np.testing.assert_array_equal(s.query.x_NxF, ref.query.x_NxF)

    arrs = good_arrays()
    path = tmp_path / "cfgdata.npz"
    np.savez(path, **arrs)
    cfg.path = str(path)
    s2 = load(cfg)  # path wins over the embedded name
    assert s2.name == "cfgdata"
    np.testing.assert_array_equal(s2.train.x_NxF, arrs["x_train"])

    cfg.path = str(tmp_path / "missing.npz")
    with pytest.raises(DataError, match=r"does not exist"):
        load(cfg)


def test_load_unknown_embedded_name():
    cfg = ConfigDict({"name": "mnist", "path": "", "seed": 0, "n_train": 100, "n_query": 20})
    with pytest.raises(DataError, match=r"unknown embedded data set 'mnist'"):
        load(cfg)
