"""stride-jax: STRIDE training-data attribution (steering operators + sparse recovery) in JAX.

Typical use::

    from stride_jax import LogitHook, attribute, base_config
    scores = attribute(hook, train_set, query_set, base_config().stride)
"""

from stride_jax.config import base_config
from stride_jax.data import Dataset, Splits, load_digits, load_npz
from stride_jax.operators import HiddenHook, HiddenSiteOperators, LogitHook, SteeringOperators
from stride_jax.pipeline import Scores, attribute

__all__ = [
    "Dataset",
    "HiddenHook",
    "HiddenSiteOperators",
    "LogitHook",
    "Scores",
    "Splits",
    "SteeringOperators",
    "attribute",
    "base_config",
    "load_digits",
    "load_npz",
]
