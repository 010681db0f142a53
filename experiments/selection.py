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

from stride_jax.apps import selection
from stride_jax.job import cli

DEFAULT_CONFIG = cli.config_file("apps_quick.py")

if __name__ == "__main__":
    cli.application(selection.job, selection.format_table, "selection", DEFAULT_CONFIG)
