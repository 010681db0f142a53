"""Data loading: the ``Dataset`` type, embedded defaults and user files."""

from stride_jax.data.dataset import (
    DataError,
    Dataset,
    Splits,
    load,
    load_digits,
    load_npz,
    make_splits,
)

__all__ = ["DataError", "Dataset", "Splits", "load", "load_digits", "load_npz", "make_splits"]
