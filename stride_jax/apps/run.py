"""What every application starts from: a run's base model and its methods' score matrices.

``open_run(config, workdir)`` builds (or reuses from the workdir) the base model of a run
config, exactly as the LDS job does, without the ground-truth retrains; ``scores`` then gives
each method's score matrix on the run's queries, reusing ``scores_<method>.npy`` of an LDS
job run in the same workdir with the same method config. ``finished_run(workdir)`` reopens a
finished LDS job from its ``config.json`` and ``results.json``. ``save`` writes an
application's numbers as JSON atomically (a killed run leaves the previous file intact).
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from stride_jax import checkpoint
from stride_jax.apps import config as apps_config
from stride_jax.errors import ConfigError
from stride_jax.job import benchmark, models
from stride_jax.job.config import method_block, validate


def load_checked(config, workdir: str):
    """``(splits, names)``: the run's data (``models.load_data``) and the methods an
    application compares (``apps_config.app_methods``), each checked before any model is
    trained, so that a bad setting found against the data costs no training. An unknown
    method, or one the task kind lacks, is a ``ConfigError`` naming the config key. When
    ``apps.methods`` is set it becomes the run's ``methods`` (so STRIDE's automatic sizes are
    planned when only the applications ask for it)."""
    validate(config)
    key = "config.apps.methods" if tuple(config.apps.methods) else "config.methods"
    names = apps_config.app_methods(config)
    for name in names:
        try:
            method_block(config, name)  # a method or a config.variants label
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    if tuple(config.apps.methods):
        config.methods = tuple(names)
    models.resolve(config)
    return models.load_data(config, workdir), names


def num_examples(rows) -> int:
    """Training examples of a row set (a decoder's long examples span several rows)."""
    return int(getattr(rows, "num_examples", len(rows)))


def open_run(config, workdir: str, splits=None) -> benchmark.Context:
    """The run's data and base model (``benchmark.prepare``; reused when cached)."""
    for name in apps_config.app_methods(config):
        method_block(config, name)  # unknown labels and missing blocks: a ConfigError
    return benchmark.prepare(config, workdir, splits)


def scores(ctx: benchmark.Context, names) -> dict[str, np.ndarray]:
    """``{method: scores_QxE}`` on the run's queries (float32; higher = the example lowers
    the query's loss), each computed once per method config and base model."""
    out = {}
    for label in names:
        name, cfg = method_block(ctx.config, label)
        sub_dir = benchmark.method_dir(ctx.config, ctx.workdir, label)
        out[label], _ = benchmark.method_scores(ctx, label, name, cfg, sub_dir)
    return out


def finished_run(workdir: str):
    """``(config, results)`` of a finished LDS job in ``workdir`` (its resolved config.json
    and results.json); a ``ConfigError`` when the workdir holds no finished run."""
    paths = [os.path.join(workdir, f) for f in ("results.json", "config.json")]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ConfigError(
            f"{workdir} holds no finished run ({os.path.basename(missing[0])} is missing): run "
            f"`python -m experiments.lds_benchmark --workdir={workdir}` first"
        )
    with open(paths[0]) as f:
        results = json.load(f)
    with open(paths[1]) as f:
        stored = json.load(f)
    return _on_defaults(stored), results


def _on_defaults(stored: dict) -> ml_collections.ConfigDict:
    """A stored run config on top of today's defaults for its kind, so a config.json written
    before a block existed (e.g. ``apps``) still has every key; stored values win."""
    from stride_jax.job.config import base_config

    if stored.get("task") not in ("classifier", "decoder"):
        raise ConfigError(f"config.json has no valid 'task' (got {stored.get('task')!r})")
    config = base_config(stored["task"])

    def merge(into, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(into.get(key), ml_collections.ConfigDict):
                merge(into[key], value)
            else:
                with into.ignore_type():
                    into[key] = value

    merge(config, stored)
    return config


def run_methods(results: dict) -> list[str]:
    """The methods a finished run scored (results.json's ``methods``)."""
    return list(results.get("methods", {}))


def check_method(name: str, available) -> None:
    """A ``ConfigError`` when ``name`` is not among the methods a run computed."""
    if name not in available:
        raise ConfigError(
            f"method {name!r} was not computed by this run; it has {sorted(available)}"
        )


def check_query(index: int, num_queries: int) -> None:
    """A ``ConfigError`` when a query index is outside the run's queries."""
    if not 0 <= index < num_queries:
        raise ConfigError(
            f"query {index} is out of range: the run has {num_queries} queries "
            f"(0..{num_queries - 1})"
        )


def save(workdir: str, name: str, payload: dict) -> str:
    """``workdir/<name>.json``, written atomically; returns its path."""
    path = os.path.join(workdir, f"{name}.json")
    checkpoint.save_json(path, payload)
    return path
