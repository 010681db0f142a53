"""The digits pipeline made small enough for a smoke run (< 3 minutes on 2 CPU cores)."""

from stride_jax.job.config import base_config


def get_config():
    c = base_config("classifier")
    c.data.n_train = 400
    c.data.n_query = 50
    c.groundtruth.num_models = 20
    c.groundtruth.models_per_batch = 20
    c.stride.design.num_subsets = 200
    c.stride.stage1.sketch_dim = 16
    c.lds.n_boot = 200
    return c
