"""sft_chitchat made tiny for the default test suite: a 16-wide character GPT pre-trained for
60 steps, fine-tuned on 48 chit-chat pairs; 8 retrains."""

from experiments.configs import lm_shakespeare_quick


def get_config():
    c = lm_shakespeare_quick.get_config()
    c.data.update(name="chitchat", tokenizer="pretrained", block_len=32, n_train=48, n_val=0)
    c.model.source = "pretrain"
    c.pretrain.data.update(block_len=32, n_train=256, n_query=16)
    c.pretrain.model.update(d_model=16, n_layers=2, n_heads=2, max_len=32)
    c.pretrain.train.update(steps=60, batch=8, warmup_steps=5)
    c.pretrain.ckpt_every = 30
    c.train.update(steps=30, lr=1e-3)
    return c
