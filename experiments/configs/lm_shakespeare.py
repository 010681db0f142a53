"""Pre-training attribution: a character-level GPT on Shakespeare (2,000 training blocks of
64 characters, 100 held-out query blocks), 64 retrains at alpha 0.5 from the same init."""

from stride_jax.job.config import LM_METHODS, base_config


def get_config():
    c = base_config("decoder")
    c.data.update(block_len=64, n_train=2000, n_val=100, n_query=100)
    c.methods = LM_METHODS
    # EK-FAC chosen on the validation blocks (16 points; experiments/RESULTS.md): every MLP,
    # the true Fisher (labels sampled from the model), damping 1e-3 (relative).
    c.baselines.ekfac.update(layers=2, fisher="sampled", damping=1e-3)
    c.baselines.kfac.update(layers=2, fisher="sampled", damping=1e-3)  # EK-FAC's, not tuned
    return c
