"""The applications on MNIST-5k (4,300 training images, 500 queries), with the tuned methods
of experiments/configs/mnist.py: STRIDE (T=12000, N=4300, Gauss-Newton stage 1 at the hidden
and logit sites), gradient-dot, TRAK-1 and EK-FAC, against random.

python -m experiments.selection --config=experiments/configs/apps_mnist.py --workdir=DIR
(and contamination, tailpatch, removal with the same workdir: scores are computed once).
"""

from experiments.configs import mnist


def get_config():
    c = mnist.get_config()
    c.methods = ("stride", "graddot", "trak1", "ekfac")
    c.apps.removal.update(num_queries=20, ks=(10, 50), seeds=2)
    return c
