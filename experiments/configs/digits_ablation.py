"""Digits plus the ablations (without each loss, and with the Bernoulli design), on the
Adam-trained stage 1 (200 steps from zero gates, T=1000, Lasso lam_frac 0.01, unweighted
responses): with the default Gauss-Newton start and no Adam steps the linearity loss plays no
part, so its ablation would be the default itself."""

from stride_jax.job.config import ABLATION_NAMES, base_config
from stride_jax.stride import defaults


def get_config():
    c = base_config("classifier")
    c.stride.stage1 = defaults.stage1_defaults()
    c.stride.design.num_subsets = 1000
    c.stride.lasso = defaults.lasso_defaults()
    c.stride.size_weighted = False
    c.ablations = ABLATION_NAMES
    return c
