"""Tune any method on validation queries: python -m experiments.tune --workdir=DIR --method=M.

The validation split replaces the queries (``data.query_split=val``), so tuning never sees the
reported queries, and every method gets the same protocol: a grid over keys of its own config
block (``config.stride`` or ``config.baselines.<method>``), e.g.
``--method=stride --sweep=stage1.w_linearity=0,1,10 --sweep=lasso.lam_frac=0.02,0.05`` or
``--method=trak --sweep=proj_dim=512,2048 --sweep=damping=1e-4,1e-2``; the grid is the
product. Prints one LDS line per point and writes DIR/tuning_<method>.json; put the chosen
values into the config file.
"""

import itertools
import os

from absl import app, flags, logging
from ml_collections import config_flags

from stride_jax import benchmark, checkpoint, cli

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py", "Config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_METHOD = flags.DEFINE_string("method", "stride", "Registered method to tune.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "<key>=v1,v2,... in the method's config.")


def main(_):
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(benchmark.only_stride_jax_info)
    config = _CONFIG.value
    config.data.query_split = "val"
    config.methods = ()
    benchmark.run(config, _WORKDIR.value)  # base model + ground truth on validation queries
    ctx, gt = benchmark.context(config, _WORKDIR.value)
    axes = cli.parse_sweep(_SWEEP.value)
    rows = []
    for values in itertools.product(*(v for _, v in axes)):
        sub = benchmark.method_config(config, _METHOD.value).copy_and_resolve_references()
        for (key, _), value in zip(axes, values, strict=True):
            cli.set_path(sub, key, value)
        name = "_".join(f"{k}={v}" for (k, _), v in zip(axes, values, strict=True)) or "default"
        sweep_dir = cli.sweep_dir(_WORKDIR.value, _METHOD.value, name, sub)
        scores, _ = benchmark.run_method(ctx, _METHOD.value, sub, sweep_dir)
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
    checkpoint.save_json(os.path.join(_WORKDIR.value, f"tuning_{_METHOD.value}.json"), rows)


if __name__ == "__main__":
    app.run(main)
