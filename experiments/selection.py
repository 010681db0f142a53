"""Data selection: python -m experiments.selection --workdir=DIR [--config=...].

For each fraction in ``config.apps.selection.fractions``, each method (``apps.methods``, or the
run's ``methods``) and each aggregation rule (``greedy``: the paper's best rank over the
queries; ``mean``): keep the training examples ranked highest for the run's queries, retrain
a fresh model on them alone and report its mean loss (and accuracy) on those queries against
random selections of the same size and the full-data model (``stride_jax.apps.selection``).
The base model and the method scores are reused from an LDS job (or an earlier application)
in the same workdir. Writes DIR/selection.json and prints a table.

python -m experiments.selection --workdir=/tmp/apps --config.data.path=FILE.npz
"""

from absl import app, flags
from ml_collections import config_flags

from stride_jax.apps import selection
from stride_jax.job import cli

DEFAULT_CONFIG = cli.config_file("apps_quick.py")


def define_flags(default_config: str = DEFAULT_CONFIG) -> None:
    """Flags live here, not at import: tests import this module beside other binaries."""
    config_flags.DEFINE_config_file("config", default_config, "Run config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = cli.run_job(selection.job, flags.FLAGS.config, flags.FLAGS.workdir)
    print(selection.format_table(result))
    print(f"results: {result['path']}")


if __name__ == "__main__":
    cli.run_app(main, define_flags, DEFAULT_CONFIG)
