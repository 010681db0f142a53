"""Shared plumbing of the absl binaries in experiments/: logging, user errors, the summary."""

from __future__ import annotations

import hashlib
import json
import os
import sys

from absl import logging

from stride_jax.checkpoint import CheckpointError
from stride_jax.data import DataError
from stride_jax.errors import ConfigError
from stride_jax.logs import only_stride_jax_info
from stride_jax.task import TaskError

USER_ERRORS = (DataError, ConfigError, CheckpointError, TaskError)


def run_job(job, *args, extra_errors: tuple = ()):
    """``job(*args)`` with INFO progress from this package; a user error (bad data, config or
    workdir) prints one line naming the problem and exits 1 instead of a traceback."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(only_stride_jax_info)
    try:
        return job(*args)
    except (*USER_ERRORS, *extra_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def print_summary(results: dict, workdir: str) -> None:
    """The LDS table, the noise ceiling and where results.json is."""
    print(format_table(results))
    if "noise_ceiling" in results:
        nc = results["noise_ceiling"]
        print(
            f"noise ceiling (retrains vs retrains): LDS {nc['lds']:.4f} "
            f"[{nc['lds_ci95'][0]:.3f}, {nc['lds_ci95'][1]:.3f}]"
        )
    print(f"results: {workdir}/results.json")


def _parse(value: str):
    """JSON values (numbers, true/false, lists) as such; anything else as a string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_sweep(sweep: list[str]) -> list[tuple[str, list]]:
    """Tuning axes: ``["a.b=1,2", "c=x"]`` -> ``[("a.b", [1, 2]), ("c", ["x"])]``."""
    for s in sweep:
        if "=" not in s:
            raise ConfigError(f"--sweep {s!r} is not of the form key=v1,v2,...")
    pairs = (s.split("=", 1) for s in sweep)
    return [(key, [_parse(v) for v in values.split(",")]) for key, values in pairs]


def set_path(config, key: str, value) -> None:
    """``config["a"]["b"] = value`` for key "a.b"; a key the config lacks raises
    ``ConfigError`` (a typo in a sweep must not silently add a setting nothing reads)."""
    *blocks, leaf = key.split(".")
    for block in blocks:
        if block not in config:
            raise ConfigError(f"unknown config key {key!r}: no block {block!r}")
        config = config[block]
    if leaf not in config:
        raise ConfigError(f"unknown config key {key!r}; known here: {sorted(config.keys())}")
    config[leaf] = value


def sweep_dir(workdir: str, method: str, name: str, method_config) -> str:
    """Where one sweep point caches its work: named by the point and a digest of the method's
    whole resolved config, so points of sweeps over different base settings never collide."""
    digest = hashlib.sha256(method_config.to_json(sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(workdir, "sweep", method, f"{name}-{digest}")


def _delta(d) -> str:
    if d is None:
        return ""
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def format_table(results: dict) -> str:
    """The LDS table printed at the end of a run: one row per method and ablation."""
    rows = [("method", "LDS", "95% CI", "Pearson", "Kendall", "seconds", "vs stride (paired CI)")]
    entries = list(results["methods"].items())
    entries += [
        (f"stride w/o {k}" if k.startswith("no_") else f"stride {k}", v)
        for k, v in results.get("ablations", {}).items()
    ]
    for name, r in entries:
        rows.append(
            (
                name.replace("w/o no_", "w/o "),
                f"{r['lds']:.4f}",
                f"[{r['lds_ci95'][0]:.3f}, {r['lds_ci95'][1]:.3f}]",
                f"{r['lds_pearson']:.4f}",
                f"{r['lds_kendall']:.4f}",
                f"{r['seconds']:.1f}",
                _delta(r.get("delta_vs_stride")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
