"""SFT attribution on CPU: a character-level GPT pre-trained here on Shakespeare, fine-tuned
on chit-chat prompt/response pairs (loss on response tokens only); retrains fine-tune the
same pre-trained model on alpha-subsets of the pairs."""

from experiments.configs import lm_shakespeare
from stride_jax.job.config import LM_METHODS, base_config, recipe


def get_config():
    c = base_config("decoder")
    c.data.update(name="chitchat", block_len=64, n_train=1000, n_val=50, n_query=100)
    c.model.source = "pretrain"
    # The pre-trained model's tokenizer is used for the SFT data (unknown characters refused).
    c.data.tokenizer = "pretrained"
    c.train = recipe(steps=200, lr=1e-3, warmup_steps=20)
    c.groundtruth.seeds = 2  # each retention mask fine-tuned with two seeds, losses averaged
    # The baselines take lm_shakespeare's validation-chosen settings (not tuned on SFT); EK-FAC
    # with the empirical Fisher as a variant.
    lm_shakespeare.tuned_baselines(c)
    c.variants.ekfac_empirical = dict(method="ekfac", layers=2, fisher="empirical", damping=1e-3)
    # The paper's recipe at T = N/4 of the 2,325 training rows, stage 1 cut as in lm_shakespeare.
    c.variants.stride_paper = dict(
        method="stride",
        preset="paper",
        design=dict(num_subsets=580),
        stage1=dict(steps=300, fidelity_batch=4, ckpt_every=100),
    )
    # The default recipe in the compressive regime: T = N/2 and N/4 of the rows.
    c.variants.stride_half = dict(method="stride", design=dict(num_subsets=1162))
    c.variants.stride_quarter = dict(method="stride", design=dict(num_subsets=580))
    stride_rows = ("stride", "stride_half", "stride_quarter", "opspace", "stride_paper")
    c.methods = (*stride_rows, *LM_METHODS[2:], "ekfac_empirical")
    return c
