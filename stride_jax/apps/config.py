"""The ``apps`` block of a run config: what the applications (``stride_jax.apps``) do.

Every run config has it (``job.config.base_config``), so one config file serves the LDS job
and each application binary (experiments/selection.py, contamination.py, tailpatch.py,
removal.py, explain.py); the LDS job reads only ``apps.report``.

- ``methods``: the methods each application compares (empty: the run's ``methods``);
  ``"random"`` (i.i.d. scores, the floor) is always added.
- ``selection``: ``fractions`` of the training examples kept (each in (0, 1)), ``aggregate``
  rules ("greedy": each example's best rank over the target queries, the paper's rule;
  "mean": its mean score), ``random_draws`` random selections of each size, ``seed``.
- ``contamination``: ``rate`` (the fraction of query examples copied into the training set,
  in (0, 1)), ``noise`` (perturbed image copies: Gaussian noise of this many feature standard
  deviations), ``token_frac`` (perturbed text copies: this fraction of the target tokens
  replaced, at least one), ``ks`` (the top / bottom k of each recall), ``seed``.
- ``tailpatch``: ``ks`` (proponents per step), ``lr`` (the one gradient step's learning
  rate), ``num_queries`` (0: all), ``random_draws``, ``seed``.
- ``removal``: ``ks`` (examples removed), ``num_queries`` (a sample of the queries; 0: all),
  ``seeds`` (retrain seeds per removal), ``seed``.
- ``report``: ``queries`` (how many query pages the LDS job writes next to results.json) and
  ``top`` (proponents and opponents shown on a page).
"""

from __future__ import annotations

import ml_collections

from stride_jax.errors import ConfigError


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            methods=(),
            selection=dict(
                fractions=(0.1, 0.3), aggregate=("greedy", "mean"), random_draws=5, seed=0
            ),
            contamination=dict(rate=0.1, noise=0.1, token_frac=0.1, ks=(10, 100), seed=0),
            tailpatch=dict(ks=(10,), lr=1e-2, num_queries=0, random_draws=5, seed=0),
            removal=dict(ks=(10, 50), num_queries=20, seeds=2, seed=0),
            report=dict(queries=3, top=8),
        )
    )


def app_methods(config) -> tuple[str, ...]:
    """The methods an application compares: ``apps.methods`` (or the run's), plus random."""
    names = tuple(config.apps.methods) or tuple(config.methods)
    return names + (() if "random" in names else ("random",))


def fraction(value, key: str) -> float:
    """``value`` as a float in the open interval (0, 1), or a ``ConfigError`` naming ``key``."""
    if not (isinstance(value, (int, float)) and 0.0 < float(value) < 1.0):
        raise ConfigError(f"config.apps.{key} must be in (0, 1), got {value!r}")
    return float(value)


def counts(values, key: str, upper: int, what: str) -> tuple[int, ...]:
    """Positive integers no larger than ``upper`` (``what`` names it), or a ``ConfigError``."""
    values = tuple(values)
    if not values:
        raise ConfigError(f"config.apps.{key} is empty")
    for v in values:
        if not (isinstance(v, int) and 0 < v <= upper):
            raise ConfigError(f"config.apps.{key} has {v!r}: each must be in 1..{upper} ({what})")
    return values
