"""Sweep STRIDE settings on validation queries: python -m experiments.tune_stride --workdir=DIR.

Uses ``--config.data.query_split=val`` semantics (set here) so tuning never sees the reported
queries. Each sweep point is ``key=v1,v2,...`` under ``stride`` (e.g.
``--sweep=stage1.w_linearity=0,1,10 --sweep=lasso.lam_frac=0.02,0.05``); the grid is the
product. Prints one LDS line per point and writes DIR/tuning.json.
"""

import itertools
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from stride_jax import benchmark, checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py", "Config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_SWEEP = flags.DEFINE_multi_string("sweep", [], "stride.<key>=v1,v2,... (repeatable).")


def _parse(value: str):
    """JSON values (numbers, true/false, lists) as such; anything else as a string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def main(_):
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(benchmark.only_stride_jax_info)
    config = _CONFIG.value
    config.data.query_split = "val"
    config.methods = ()
    benchmark.run(config, _WORKDIR.value)  # base model + ground truth on validation queries
    ctx, gt = benchmark.context(config, _WORKDIR.value)
    axes = [
        (k, [_parse(v) for v in vals.split(",")])
        for k, vals in (s.split("=", 1) for s in _SWEEP.value)
    ]
    rows = []
    for values in itertools.product(*(v for _, v in axes)):
        sub = config.stride.copy_and_resolve_references()
        for (key, _), value in zip(axes, values, strict=True):
            block, leaf = key.rsplit(".", 1) if "." in key else ("", key)
            target = sub if not block else eval("sub." + block)  # noqa: S307 - config path
            target[leaf] = value
        name = "_".join(f"{k}={v}" for (k, _), v in zip(axes, values, strict=True)) or "default"
        scores, _ = benchmark.run_method(
            ctx, "stride", sub, os.path.join(_WORKDIR.value, "sweep", name)
        )
        res = benchmark.evaluate(scores, gt, config.lds.n_boot)
        rows.append(
            {
                "point": dict(zip((k for k, _ in axes), values, strict=True)),
                "lds": res["lds"],
                "lds_ci95": res["lds_ci95"],
            }
        )
        print(
            f"{name}: LDS {res['lds']:.4f} [{res['lds_ci95'][0]:.3f}, {res['lds_ci95'][1]:.3f}]",
            flush=True,
        )
    checkpoint.save_json(os.path.join(_WORKDIR.value, "tuning.json"), rows)


if __name__ == "__main__":
    app.run(main)
