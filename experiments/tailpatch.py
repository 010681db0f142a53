"""Tail-patch evaluation, any task kind:
python -m experiments.tailpatch --workdir=DIR [--config=experiments/configs/apps_quick.py]

For each query, one gradient-descent step (``apps.tailpatch.lr``) on the base model with the
top-k examples of each method, its bottom-k and random k-sets; reports the change in the
query's log-probability and the lift over random with 95% CIs
(``stride_jax.apps.tailpatch``). Writes DIR/tailpatch.json (scores cached in DIR, shared with
the LDS job and the other applications) and prints the table.
"""

from stride_jax.apps import tailpatch
from stride_jax.job import cli

DEFAULT_CONFIG = cli.config_file("apps_quick.py")

if __name__ == "__main__":
    cli.application(tailpatch.run, tailpatch.format_table, "tailpatch", DEFAULT_CONFIG)
