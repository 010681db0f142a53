"""Language-model LDS benchmark:
python -m experiments.lm_benchmark --config=experiments/configs/lm_shakespeare.py --workdir=DIR

Trains (or imports and fine-tunes) the base decoder, retrains the ground-truth models, runs the
configured attribution methods and writes DIR/results.json, lds.png, table.md, scores_*.npy.
"""

from absl import app, flags
from ml_collections import config_flags

from stride_jax import cli, lm_benchmark

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/lm_shakespeare.py", "Run config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    results = cli.run_job(
        lm_benchmark.run,
        _CONFIG.value,
        _WORKDIR.value,
        extra_errors=(ValueError, FileNotFoundError),  # e.g. a bad checkpoint directory
    )
    cli.print_summary(results, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
