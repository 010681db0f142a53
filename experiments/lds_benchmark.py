"""LDS benchmark, any task kind: python -m experiments.lds_benchmark --workdir=DIR [--config=...].

Builds the config's task (``config.task``: a classifier, e.g. experiments/configs/digits.py, or
a decoder, e.g. lm_shakespeare.py), trains (or imports and fine-tunes) the base model, retrains
the ground-truth models, runs the configured attribution methods and writes DIR/results.json,
lds.png, table.md, scores_<method>.npy and config.json.
"""

from absl import app, flags

from stride_jax.job import benchmark, cli

DEFAULT_CONFIG = cli.config_file("digits.py")


def define_flags(default_config: str = DEFAULT_CONFIG) -> None:
    """Flags live here, not at import: the LM alias defines them with its own default (a
    config path is resolved against the repository when it does not exist from here)."""
    cli.define_run_flags(default_config)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    # A decoder run also reports a bad checkpoint directory as one line.
    extra = (ValueError, FileNotFoundError) if config.get("task") == "decoder" else ()
    results = cli.run_job(benchmark.run, config, workdir, extra_errors=extra)
    cli.print_summary(results, workdir)


if __name__ == "__main__":
    cli.run_app(main, define_flags, DEFAULT_CONFIG)
