"""Tune any method on any task kind on validation queries:
python -m experiments.tune --config=CONFIG --workdir=DIR --method=M --sweep=KEY=v1,v2,...

Every method gets the same protocol (``stride_jax.job.tune``): a grid over keys of its own
config block (``config.stride`` or ``config.baselines.<method>``), e.g.
``--method=stride --sweep=stage1.w_linearity=0,1,10 --sweep=lasso.lam_frac=0.02,0.05`` or
``--method=trak --sweep=proj_dim=512,2048 --sweep=damping=1e-4,1e-2``; the grid is the
product. A classifier config is tuned on its validation split (``data.query_split=val``); a
decoder config on the validation rows its ground-truth retrains already scored (the same
workdir as the LM job). Prints one LDS line per point and writes DIR/tuning_<method>.json;
put the chosen values into the config file.
"""

from absl import app, flags
from ml_collections import config_flags

from stride_jax.job import cli, tune

DEFAULT_CONFIG = cli.config_file("digits.py")


def define_flags(default_config: str = DEFAULT_CONFIG) -> None:
    """Flags live here, not at import: tests import this module beside other binaries."""
    config_flags.DEFINE_config_file("config", default_config, "Run config file.")
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)
    flags.DEFINE_string("method", "stride", "Registered method to tune.")
    flags.DEFINE_multi_string("sweep", [], "<key>=v1,v2,... in the method's config.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cli.run_job(tune.tune, f.config, f.workdir, f.method, f.sweep)


if __name__ == "__main__":
    cli.run_app(main, define_flags, DEFAULT_CONFIG)
