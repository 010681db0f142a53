"""Alias of experiments.lds_benchmark with a language-model default config:
python -m experiments.lm_benchmark --config=experiments/configs/lm_shakespeare.py --workdir=DIR
"""

from absl import app

from experiments import lds_benchmark

if __name__ == "__main__":
    lds_benchmark.define_flags("experiments/configs/lm_shakespeare.py")
    app.run(lds_benchmark.main)
