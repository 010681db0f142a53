"""Language-model LDS benchmark:
python -m experiments.lm_benchmark --config=experiments/configs/lm_shakespeare.py --workdir=DIR

Trains (or imports and fine-tunes) the base decoder, retrains the ground-truth models, runs the
configured attribution methods and writes DIR/results.json, lds.png, table.md, scores_*.npy.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from stride_jax import benchmark, lm_benchmark
from stride_jax.checkpoint import CheckpointError
from stride_jax.config import ConfigError
from stride_jax.data import DataError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/lm_shakespeare.py", "Run config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(benchmark.only_stride_jax_info)
    try:
        results = lm_benchmark.run(_CONFIG.value, _WORKDIR.value)
    except (DataError, ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(benchmark.format_table(results))
    if "noise_ceiling" in results:
        nc = results["noise_ceiling"]
        print(
            f"noise ceiling (retrains vs retrains): LDS {nc['lds']:.4f} "
            f"[{nc['lds_ci95'][0]:.3f}, {nc['lds_ci95'][1]:.3f}]"
        )
    print(f"results: {_WORKDIR.value}/results.json")


if __name__ == "__main__":
    app.run(main)
