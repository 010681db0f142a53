"""Alias of experiments.lds_benchmark with a language-model default config:
python -m experiments.lm_benchmark --config=experiments/configs/lm_shakespeare.py --workdir=DIR
"""

from experiments import lds_benchmark
from stride_jax.job import cli

if __name__ == "__main__":
    default = cli.config_file("lm_shakespeare.py")
    cli.run_app(lds_benchmark.main, lambda: lds_benchmark.define_flags(default), default)
