"""Pre-train a small decoder from scratch: python -m experiments.pretrain_lm --workdir=DIR
(default config: experiments/configs/pretrain_shakespeare.py).

Character or BPE tokens (``--config.data.tokenizer``), a text file (``data.name=textfile``,
``data.path=corpus.txt``), a JSONL corpus (``data.name=jsonl``) or the embedded Shakespeare.
Checkpointed with orbax every ``ckpt_every`` steps (a killed run resumes); the result is a
Hugging Face directory DIR/hf (config.json, model.safetensors, stride_tokenizer.json) that
the LDS job (``model.source=hf``) and transformers can load.
"""

from absl import app, flags
from ml_collections import config_flags

from stride_jax.job import cli, pretrain

DEFAULT_CONFIG = cli.config_file("pretrain_shakespeare.py")


def define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Pre-training config.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    path = cli.run_job(pretrain.pretrain, f.config, f.workdir, extra_errors=(ValueError,))
    print(f"model: {path}")


if __name__ == "__main__":
    cli.run_app(main, define_flags, DEFAULT_CONFIG)
