"""Your own decoder and text: fine-tune a Hugging Face directory (``model.path``; or a GGUF
file with ``model.source='gguf'``) on your JSONL file (``data.path``: ``{"text": ...}`` or
``{"prompt": ..., "response": ...}`` per line) and attribute its queries.

Everything data-dependent is automatic (printed at the start as ``auto: ...``): the model's
own tokenizer, block length = the model's max_len (at most 128), a tenth of the examples (at
most 100) as queries and as validation rows, STRIDE's T from N. Every LM method but ``minilm``
(which needs ``python -m experiments.fetch_minilm`` first) runs.

    python -m experiments.lds_benchmark --config=experiments/configs/lm_own.py \\
        --workdir=runs/mine --config.model.path=/path/to/hf_dir --config.data.path=mine.jsonl
"""

from stride_jax.job.config import LM_METHODS, base_config, recipe


def get_config():
    c = base_config("decoder")
    c.data.name = "jsonl"
    c.model.source = "hf"
    c.train = recipe(steps=200, lr=1e-3, warmup_steps=20)  # fine-tuning, as sft_chitchat
    c.methods = tuple(m for m in LM_METHODS if m != "minilm")
    return c
