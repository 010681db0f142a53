"""The applications on the tiny Shakespeare decoder of lm_shakespeare_quick (64 training
rows, 8 queries): STRIDE against gradient-dot, TRAK-1, EK-FAC and TF-IDF, against random.

python -m experiments.contamination --config=experiments/configs/apps_lm_quick.py --workdir=DIR
"""

from experiments.configs import lm_shakespeare_quick


def get_config():
    c = lm_shakespeare_quick.get_config()
    c.methods = ("stride", "graddot", "trak1", "ekfac", "tfidf")
    c.apps.removal.update(num_queries=8, ks=(4, 16), seeds=2)
    c.apps.tailpatch.update(ks=(4,))
    c.apps.contamination.update(rate=0.5, ks=(4, 16))
    return c
