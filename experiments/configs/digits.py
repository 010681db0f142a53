"""Default: scikit-learn digits (1,400 train / 200 queries), MLP, 100 retrains at alpha 0.5."""

from stride_jax.job.config import base_config


def get_config():
    return base_config("classifier")
