"""Classification data: one ``Dataset`` type, the embedded digits default, user .npz files.

Every loader validates its arrays and raises ``DataError`` with one line naming the array and
the problem, before any work is done.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


class DataError(ValueError):
    """Bad user data: the message names the array and the problem."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Features ``x_NxF`` (float32), integer labels ``y_N`` (int32) and ids ``ids_N``."""

    x_NxF: np.ndarray
    y_N: np.ndarray
    ids_N: np.ndarray

    def __len__(self) -> int:
        return int(self.y_N.shape[0])

    def subset(self, idx) -> Dataset:
        """Rows ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= len(self))):
            raise DataError(f"subset indices must be 1-D in [0, {len(self)}), got {idx.shape}")
        return Dataset(self.x_NxF[idx], self.y_N[idx], self.ids_N[idx])

    def concat(self, other: Dataset) -> Dataset:
        """These rows followed by ``other``'s (the same features)."""
        if other.x_NxF.shape[1:] != self.x_NxF.shape[1:]:
            raise DataError(
                f"cannot append rows of {other.x_NxF.shape[1]} features to rows of "
                f"{self.x_NxF.shape[1]}"
            )
        return Dataset(
            np.concatenate([self.x_NxF, other.x_NxF]).astype(self.x_NxF.dtype),
            np.concatenate([self.y_N, other.y_N]).astype(self.y_N.dtype),
            _concat_ids(self.ids_N, other.ids_N),
        )


def _concat_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ids of both sets; kept as objects when their kinds differ (e.g. ints and strings)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == b.dtype.kind:
        return np.concatenate([a, b])
    return np.concatenate([a.astype(object), b.astype(object)])


@dataclasses.dataclass(frozen=True)
class Splits:
    """Training set (attributed to), query set (attributed from), optional validation set."""

    name: str
    train: Dataset
    query: Dataset
    num_classes: int
    val: Dataset | None = None


def _check_x(name: str, x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise DataError(f"{name} must be 2-D (examples x features), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (0 examples)")
    if x.shape[1] == 0:
        raise DataError(f"{name} has 0 features")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{name} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{name} contains NaN or inf")
    return x


def _check_y(name: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {y.shape}")
    if y.shape[0] != n:
        raise DataError(f"{name} has {y.shape[0]} labels but its features have {n} rows")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise DataError(f"{name} contains NaN or inf")
        if not np.all(y == np.round(y)):
            raise DataError(f"{name} must hold integer class labels, got non-integer floats")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if (y < 0).any():
        raise DataError(f"{name} has negative labels (min {int(y.min())}); labels must be 0..C-1")
    return y.astype(np.int32)


def _check_held_out(split: str, x, y, num_features: int, num_classes: int):
    """Checked (x, y) of the query or validation split against the training set's shapes."""
    x = _check_x(f"x_{split}", np.asarray(x))
    if x.shape[1] != num_features:
        raise DataError(f"x_{split} has {x.shape[1]} features but x_train has {num_features}")
    y = _check_y(f"y_{split}", np.asarray(y), x.shape[0])
    if y.max() >= num_classes:
        raise DataError(
            f"y_{split} has label {int(y.max())} but y_train only has labels 0..{num_classes - 1}"
        )
    return x, y


def make_splits(name, x_train, y_train, x_query, y_query, ids_train=None, val=None) -> Splits:
    """Validate raw arrays and build ``Splits``; raises ``DataError`` on the first problem.

    The one validator of classification data (``load_npz``, ``stride_jax.datasets.from_arrays``
    and the embedded loaders all build through it). ``val`` is a ``Dataset`` or an ``(x, y)``
    pair, checked like the queries."""
    x_train = _check_x("x_train", np.asarray(x_train))
    y_train = _check_y("y_train", np.asarray(y_train), x_train.shape[0])
    num_classes = int(y_train.max()) + 1
    if num_classes < 2:
        raise DataError("y_train has a single class; attribution needs at least 2 classes")
    f = x_train.shape[1]
    x_query, y_query = _check_held_out("query", x_query, y_query, f, num_classes)
    if val is not None and not isinstance(val, Dataset):
        x_val, y_val = _check_held_out("val", *val, f, num_classes)
        val = Dataset(x_val, y_val, np.arange(x_val.shape[0]))
    if ids_train is None:
        ids_train = np.arange(x_train.shape[0])
    ids_train = np.asarray(ids_train)
    if ids_train.shape != (x_train.shape[0],):
        raise DataError(f"ids_train has shape {ids_train.shape}, expected ({x_train.shape[0]},)")
    if len(np.unique(ids_train)) != ids_train.shape[0]:
        raise DataError("ids_train has duplicate ids")
    train = Dataset(x_train, y_train, ids_train)
    query = Dataset(x_query, y_query, np.arange(x_query.shape[0]))
    return Splits(name, train, query, num_classes, val)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive; anything else (a text file, a single .npy array, object
    arrays) is refused by name. Pickled objects are never loaded."""
    with open(path, "rb") as f:
        head = f.read(6)
    how = (
        "save the arrays with numpy.savez(path, x_train=..., y_train=..., x_query=..., y_query=...)"
    )
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"{path!r} is a single .npy array, not an .npz archive: {how}")
    if not head.startswith(b"PK"):
        raise DataError(f"{path!r} is not an .npz archive (no zip header): {how}")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for k in f.files:
                try:
                    arrays[k] = f[k]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise DataError(
                        f"array {k!r} in {path!r} holds Python objects (dtype=object); "
                        "save numeric arrays"
                    ) from e
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(f"cannot read {path!r} as an .npz archive: {e}") from e
    return arrays


def load_npz(path: str) -> Splits:
    """User data: ``x_train, y_train, x_query, y_query`` (+ optional ``ids_train``)."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    arrays = _read_npz(path)
    required = ("x_train", "y_train", "x_query", "y_query")
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataError(f"{path!r} is missing array(s) {', '.join(missing)}")
    unknown = sorted(set(arrays) - set(required) - {"ids_train"})
    if unknown:
        raise DataError(f"{path!r} has unknown array(s) {', '.join(unknown)}")
    name = os.path.splitext(os.path.basename(path))[0]
    return make_splits(name, *(arrays[k] for k in required), ids_train=arrays.get("ids_train"))


def load_digits(seed: int = 0, n_train: int = 1400, n_query: int = 200) -> Splits:
    """scikit-learn's 8x8 digits (1,797 images), pixels scaled to [0, 1].

    Split by a seeded permutation into train / query / validation (the rest).
    """
    from sklearn.datasets import load_digits as _sk_digits

    x, y = _sk_digits(return_X_y=True)
    if n_train + n_query > len(y):
        raise DataError(f"n_train + n_query = {n_train + n_query} exceeds the {len(y)} digits")
    perm = np.random.default_rng(seed).permutation(len(y))
    x = (x / 16.0).astype(np.float32)
    tr, q, va = np.split(perm, [n_train, n_train + n_query])
    val = Dataset(x[va], y[va].astype(np.int32), va) if len(va) else None
    return make_splits("digits", x[tr], y[tr], x[q], y[q], ids_train=tr, val=val)


def load(config) -> Splits:
    """Data from a config: ``config.path`` (a .npz) if set, else the embedded ``config.name``.

    ``config.query_split="val"`` swaps in the validation set as the queries: hyperparameters
    are tuned there, never on the reported queries.
    """
    if config.path:
        splits = load_npz(config.path)
    elif config.name == "digits":
        splits = load_digits(config.seed, config.n_train, config.n_query)
    elif config.name == "mnist5k":
        from stride_jax.data.mnist5k import load_mnist5k  # imports this module: load lazily

        splits = load_mnist5k(config.seed, config.n_train, config.n_query, n_val=None)
    else:
        raise DataError(f"unknown embedded data set {config.name!r}; known: 'digits', 'mnist5k'")
    split = config.get("query_split", "query")
    if split == "query":
        return splits
    if split != "val":
        raise DataError(f"data.query_split must be 'query' or 'val', got {split!r}")
    if splits.val is None:
        raise DataError(f"{splits.name} has no validation split to use as queries")
    return dataclasses.replace(splits, query=splits.val, val=None)
