"""Tail-patch evaluation, any task kind:
python -m experiments.tailpatch --workdir=DIR [--config=experiments/configs/apps_quick.py]

For each query, one gradient-descent step (``apps.tailpatch.lr``) on the base model with the
top-k examples of each method, its bottom-k and random k-sets; reports the change in the
query's log-probability and the lift over random with 95% CIs
(``stride_jax.apps.tailpatch``). Writes DIR/tailpatch.json (scores cached in DIR, shared with
the LDS job and the other applications) and prints the table.
"""

from absl import app, flags
from ml_collections import config_flags

from stride_jax.apps import tailpatch
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
    results = cli.run_job(tailpatch.run, config, workdir, extra_errors=extra)
    print(tailpatch.format_table(results))
    print(f"results: {workdir}/tailpatch.json")


if __name__ == "__main__":
    cli.run_app(main, define_flags, DEFAULT_CONFIG)
