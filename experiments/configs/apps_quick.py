"""The applications on digits made small (experiments/selection.py, contamination.py,
tailpatch.py, removal.py): digits_quick's 400 training examples and 50 queries, STRIDE
against the gradient baselines and random, every application in about a minute on 2 cores.

python -m experiments.selection --config=experiments/configs/apps_quick.py --workdir=DIR
"""

from experiments.configs import digits_quick


def get_config():
    c = digits_quick.get_config()
    c.methods = ("stride", "graddot", "trak1", "ekfac")
    c.apps.selection.update(fractions=(0.1, 0.3), random_draws=3)
    c.apps.contamination.update(rate=0.2, ks=(10, 100))
    c.apps.tailpatch.update(ks=(10,), random_draws=3)
    c.apps.removal.update(ks=(10, 40), num_queries=10, seeds=2)
    return c
