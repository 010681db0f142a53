"""Contamination audit, any task kind:
python -m experiments.contamination --workdir=DIR [--config=experiments/configs/apps_quick.py]

Leaks a fraction ``apps.contamination.rate`` of the queries into the training set (an exact
and a perturbed copy of each), retrains the base model on it, attributes the queries with
every compared method and reports how often each finds the query's own copy among its top,
bottom and extreme (top or bottom) k examples (``stride_jax.apps.contamination``). Writes
DIR/contamination.json (the contaminated run is cached in DIR/contamination-<digest>/) and
prints the table.
"""

from stride_jax.apps import contamination
from stride_jax.job import cli

DEFAULT_CONFIG = cli.config_file("apps_quick.py")

if __name__ == "__main__":
    cli.application(contamination.run, contamination.format_table, "contamination", DEFAULT_CONFIG)
