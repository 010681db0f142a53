"""SFT attribution on CPU: a character-level GPT pre-trained here on Shakespeare, fine-tuned
on chit-chat prompt/response pairs (loss on response tokens only); retrains fine-tune the
same pre-trained model on alpha-subsets of the pairs."""

from stride_jax.job.config import LM_METHODS, base_config, recipe


def get_config():
    c = base_config("decoder")
    c.data.update(name="chitchat", block_len=64, n_train=1000, n_val=50, n_query=100)
    c.model.source = "pretrain"
    # The pre-trained model's tokenizer is used for the SFT data (unknown characters refused).
    c.data.tokenizer = "pretrained"
    c.train = recipe(steps=200, lr=1e-3, warmup_steps=20)
    c.groundtruth.seeds = 2  # each retention mask fine-tuned with two seeds, losses averaged
    c.methods = LM_METHODS
    return c
