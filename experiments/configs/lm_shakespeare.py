"""Pre-training attribution: a character-level GPT on Shakespeare (2,000 training blocks of
64 characters, 100 validation and 200 held-out query blocks), 64 retention masks at alpha 0.5,
each retrained from the same init with two training seeds (query losses averaged)."""

from stride_jax.job.config import LM_METHODS, base_config


def get_config():
    c = base_config("decoder")
    # The first 100 query blocks are the earlier 100-query table's (the split takes train, val,
    # then query blocks from one permutation), so training and validation rows are unchanged.
    c.data.update(block_len=64, n_train=2000, n_val=100, n_query=200)
    c.groundtruth.seeds = 2
    c.methods = LM_METHODS
    # EK-FAC chosen on the validation blocks (16 points; experiments/RESULTS.md): every MLP,
    # the true Fisher (labels sampled from the model), damping 1e-3 (relative).
    c.baselines.ekfac.update(layers=2, fisher="sampled", damping=1e-3)
    c.baselines.kfac.update(layers=2, fisher="sampled", damping=1e-3)  # EK-FAC's, not tuned
    return c
