"""Top-k removal: python -m experiments.removal --workdir=DIR [--config=...].

For a seeded sample of ``config.apps.removal.num_queries`` queries, each method (``apps.methods``,
or the run's ``methods``) and each k in ``apps.removal.ks``: remove the query's k highest-scored
training examples, retrain with ``apps.removal.seeds`` seeds, and report the rise of that
query's loss (and, for a classifier, the drop of its true class's probability) against the
full-data retrains and against removing k random examples (``stride_jax.apps.removal``). The
base model and the method scores are reused from an LDS job (or an earlier application) in
the same workdir. Writes DIR/removal.json and prints a table.

python -m experiments.removal --workdir=/tmp/apps --config.data.path=FILE.npz
"""

from absl import app, flags
from ml_collections import config_flags

from stride_jax.apps import removal
from stride_jax.job import cli

DEFAULT_CONFIG = cli.config_file("apps_quick.py")


def define_flags(default_config: str = DEFAULT_CONFIG) -> None:
    """Flags live here, not at import: tests import this module beside other binaries."""
    config_flags.DEFINE_config_file("config", default_config, "Run config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = cli.run_job(removal.job, flags.FLAGS.config, flags.FLAGS.workdir)
    print(removal.format_table(result))
    print(f"results: {result['path']}")


if __name__ == "__main__":
    cli.run_app(main, define_flags, DEFAULT_CONFIG)
