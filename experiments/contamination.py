"""Contamination audit, any task kind:
python -m experiments.contamination --workdir=DIR [--config=experiments/configs/apps_quick.py]

Leaks a fraction ``apps.contamination.rate`` of the queries into the training set (an exact
and a perturbed copy of each), retrains the base model on it, attributes the queries with
every compared method and reports how often each finds the query's own copy among its top,
bottom and extreme (top or bottom) k examples (``stride_jax.apps.contamination``). Writes
DIR/contamination.json (the contaminated run is cached in DIR/contamination-<digest>/) and
prints the table.
"""

from absl import app, flags
from ml_collections import config_flags

from stride_jax.apps import contamination
from stride_jax.job import cli

DEFAULT_CONFIG = cli.config_file("apps_quick.py")


def define_flags(default_config: str = DEFAULT_CONFIG) -> None:
    """Flags live here, not at import: tests import this module beside other binaries."""
    config_flags.DEFINE_config_file("config", default_config, "Run config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    extra = (ValueError, FileNotFoundError) if config.get("task") == "decoder" else ()
    results = cli.run_job(contamination.run, config, workdir, extra_errors=extra)
    print(contamination.format_table(results))
    print(f"results: {workdir}/contamination.json")


if __name__ == "__main__":
    cli.run_app(main, define_flags, DEFAULT_CONFIG)
