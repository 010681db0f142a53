"""STRIDE's default config block (``config.stride``) per task kind."""

from __future__ import annotations

import ml_collections

from stride_jax import pipeline


def classifier() -> ml_collections.ConfigDict:
    """Chosen on validation digits and MNIST-5k (experiments/RESULTS.md): the logit site, one
    damped Gauss-Newton step for all T=3000 operators, a size-weighted Lasso."""
    return ml_collections.ConfigDict(
        dict(
            seed=3,
            response_batch=64,
            # Multiply each subset's responses by its size before the Lasso: the fidelity loss
            # is a mean over members, so an operator answers to the average of its members.
            size_weighted=True,
            hook="logits",
            hidden_rank=64,
            hidden_basis="whitened",  # hook="hidden": "whitened" or "pca" directions
            design=dict(kind="expander", num_subsets=3000, degree=5, seed=2),
            stage1=pipeline.stage1_defaults(**pipeline.NEWTON_RECIPE),
            lasso=pipeline.lasso_defaults(lam_frac=0.003),
        )
    )


def default(kind: str) -> ml_collections.ConfigDict:
    if kind == "classifier":
        return classifier()
    from stride_jax.baselines import lm_stride_method

    return lm_stride_method.default_config()
