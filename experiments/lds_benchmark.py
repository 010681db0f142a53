"""LDS benchmark: python -m experiments.lds_benchmark --workdir=DIR [--config=...].

Trains the base model, retrains the ground-truth models, runs the configured attribution
methods and writes DIR/results.json, DIR/scores_<method>.npy and DIR/config.json.
"""

from absl import app, flags
from ml_collections import config_flags

from stride_jax import benchmark, cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/digits.py", "Run config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    results = cli.run_job(benchmark.run, _CONFIG.value, _WORKDIR.value)
    cli.print_summary(results, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
