"""Digits with every method: STRIDE, the gradient, TRAK, influence and representation
baselines, the 2000-retrain datamodel reference and the noise ceiling (~15 min on 2 cores)."""

from stride_jax.job.config import base_config


def get_config():
    c = base_config("classifier")
    c.methods = (
        "stride",
        "graddot",
        "gradcos",
        "tracin",
        "trak1",
        "trak",
        "kfac",
        "ekfac",
        "featsim",
        "random",
        "datamodel",
    )
    return c
