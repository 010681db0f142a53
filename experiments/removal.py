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

from stride_jax.apps import removal
from stride_jax.job import cli

DEFAULT_CONFIG = cli.config_file("apps_quick.py")

if __name__ == "__main__":
    cli.application(removal.job, removal.format_table, "removal", DEFAULT_CONFIG)
