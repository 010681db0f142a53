"""Alias of experiments.tune with a language-model default config:
python -m experiments.tune_lm --config=experiments/configs/lm_shakespeare.py --workdir=DIR
    --method=stride --sweep=stage1.steps=300,600 --sweep=lasso.lam_frac=0.02,0.05
"""

from experiments import tune
from stride_jax.job import cli

if __name__ == "__main__":
    default = cli.config_file("lm_shakespeare.py")
    cli.run_app(tune.main, lambda: tune.define_flags(default), default)
