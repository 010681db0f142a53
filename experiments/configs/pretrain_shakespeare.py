"""experiments/pretrain_lm.py default: a 2-layer character GPT on the embedded Shakespeare."""

from stride_jax.job.config import pretrain_config


def get_config():
    return pretrain_config()
