"""STRIDE's default config block (``config.stride``) per task kind."""

from __future__ import annotations

import ml_collections

from stride_jax.stride import pipeline


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


def decoder() -> ml_collections.ConfigDict:
    """Defaults for a small decoder on CPU; ``layer=-1`` means round(2/3 of the depth).

    Stage 1 (600 steps, 10 member rows per subset) was chosen on the 100 validation blocks of
    lm_shakespeare (``experiments/tune_lm.py``): LDS 0.129 against 0.092 for 300 steps of 4
    rows; hook layer 0 / 1 / 2 gave -0.001 / 0.092 / 0.091, stability weight 10 gave 0.083,
    Lasso lam_frac 0.01 / 0.05 / 0.2 gave 0.095 / 0.092 / 0.097.
    """
    return ml_collections.ConfigDict(
        dict(
            seed=3,
            layer=-1,
            vocab_chunk=8192,
            encode_batch=16,
            op_chunk=64,
            query_batch=1,
            design=dict(kind="expander", num_subsets=1000, degree=5, seed=2),
            stage1=pipeline.stage1_defaults(
                rank=16,
                basis_scale=1.0,
                steps=600,
                log_every=50,
                ckpt_every=300,
                warmup_steps=30,
                lr=1e-2,
                lr_muon=0.02,
                lr_end_frac=0.1,
                subsets_per_step=32,
                fidelity_rows="sample",
                fidelity_batch=10,
                stability_rows="per_subset",
                stability_batch=4,
                probe_batch=4,
                top_k=16,
                sketch_dim=16,
                linearity_over_all=False,
                w_fidelity=1.0,
                w_linearity=1.0,
                gate_l2=0.0,
            ),
            lasso=pipeline.lasso_defaults() | dict(lam_frac=0.05, maxiter=500),
        )
    )


def default(kind: str) -> ml_collections.ConfigDict:
    """The ``stride`` block for a task kind ("classifier" or "decoder")."""
    return classifier() if kind == "classifier" else decoder()
