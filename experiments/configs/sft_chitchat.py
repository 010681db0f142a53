"""SFT attribution on CPU: a character-level GPT pre-trained here on Shakespeare, fine-tuned
on chit-chat prompt/response pairs (loss on response tokens only); retrains fine-tune the
same pre-trained model on alpha-subsets of the pairs."""

from experiments.configs import lm_shakespeare
from stride_jax.job.config import base_config, recipe


def get_config():
    c = base_config("decoder")
    c.data.update(name="chitchat", block_len=64, n_train=1000, n_val=50, n_query=100)
    c.model.source = "pretrain"
    # The pre-trained model's tokenizer is used for the SFT data (unknown characters refused).
    c.data.tokenizer = "pretrained"
    c.train = recipe(steps=200, lr=1e-3, warmup_steps=20)
    c.groundtruth.seeds = 2  # each retention mask fine-tuned with two seeds, losses averaged
    # The baselines take lm_shakespeare's validation-chosen settings (not tuned on SFT), and
    # the same rows: STRIDE at T = N/2 and N/4 of the 2,325 training rows, the paper's recipe.
    lm_shakespeare.tuned_baselines(c)
    lm_shakespeare.comparison_rows(c, half=1162, quarter=580)
    return c
