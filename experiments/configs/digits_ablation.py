"""Digits default plus the ablations: without each loss, and with the Bernoulli design."""

from stride_jax.config import ABLATION_NAMES, base_config


def get_config():
    c = base_config()
    c.ablations = ABLATION_NAMES
    return c
