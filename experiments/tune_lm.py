"""Tune a language-model method on validation rows:
python -m experiments.tune_lm --config=experiments/configs/lm_shakespeare.py --workdir=DIR
    --method=stride --sweep=stage1.steps=300,600 --sweep=lasso.lam_frac=0.02,0.05

Uses the base model and ground truth of DIR (the same workdir as the LM job: built there if
missing). The ground-truth retrains also scored the validation rows, so tuning costs no extra
retraining and never sees the reported queries. The grid is the product of the ``--sweep``
axes (keys of the method's config block); prints one LDS line per point and writes
DIR/tuning_<method>.json. Put the chosen values into the config file.
"""

import itertools
import os

from absl import app, flags
from ml_collections import config_flags

from stride_jax import benchmark, checkpoint, cli, lm_benchmark
from stride_jax.baselines import base
from stride_jax.errors import ConfigError


def define_flags():
    """Flags live here, not at import: tests import ``tune`` beside other binaries."""
    config_flags.DEFINE_config_file(
        "config", "experiments/configs/lm_shakespeare.py", "Run config file."
    )
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)
    flags.DEFINE_string("method", "stride", "Registered LM method to tune.")
    flags.DEFINE_multi_string("sweep", [], "<key>=v1,v2,... in the method's config.")


def tune(config, workdir: str, method: str, sweep: list[str]) -> list[dict]:
    # Everything that can be wrong with the request fails before the retrains.
    base.get_lm(method)
    if method != "stride" and method not in config.baselines:
        raise ConfigError(f"config.baselines has no block for method {method!r}")
    if not config.data.n_val > 0:
        raise ConfigError("tuning needs validation rows: set data.n_val > 0")
    base_cfg = config.stride if method == "stride" else config.baselines[method]
    axes = cli.parse_sweep(sweep)
    for key, values in axes:
        cli.set_path(base_cfg.copy_and_resolve_references(), key, values[0])
    ctx, gt = lm_benchmark.context(config, workdir)
    if ctx.splits.val is None or "losses_val_MxV" not in gt:
        raise ConfigError("the cached ground truth has no validation rows; use a new --workdir")
    val_gt = {"masks_MxN": gt["masks_MxN"], "losses_MxQ": gt["losses_val_MxV"]}
    rows = []
    for values in itertools.product(*(v for _, v in axes)):
        sub = base_cfg.copy_and_resolve_references()
        for (key, _), value in zip(axes, values, strict=True):
            cli.set_path(sub, key, value)
        name = "_".join(f"{k}={v}" for (k, _), v in zip(axes, values, strict=True)) or "default"
        sweep_dir = cli.sweep_dir(workdir, method, name, sub)
        scores, meta = lm_benchmark.run_method(ctx, method, sub, sweep_dir, ctx.splits.val)
        res = benchmark.evaluate(scores, val_gt, config.lds.n_boot)
        point = dict(zip((k for k, _ in axes), values, strict=True))
        rows.append({"point": point, "lds": res["lds"], "lds_ci95": res["lds_ci95"], **meta})
        lo, hi = res["lds_ci95"]
        print(f"{name}: LDS {res['lds']:.4f} [{lo:.3f}, {hi:.3f}]", flush=True)
    checkpoint.save_json(os.path.join(workdir, f"tuning_{method}.json"), rows)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cli.run_job(tune, f.config, f.workdir, f.method, f.sweep)


if __name__ == "__main__":
    define_flags()
    app.run(main)
