"""experiments/pretrain_lm.py default: a 2-layer character GPT on the embedded Shakespeare."""

from stride_jax.lm_config import pretrain_config


def get_config():
    return pretrain_config()
