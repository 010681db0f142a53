"""Alias of experiments.tune with a language-model default config:
python -m experiments.tune_lm --config=experiments/configs/lm_shakespeare.py --workdir=DIR
    --method=stride --sweep=stage1.steps=300,600 --sweep=lasso.lam_frac=0.02,0.05
"""

from absl import app

from experiments import tune

if __name__ == "__main__":
    tune.define_flags("experiments/configs/lm_shakespeare.py")
    app.run(tune.main)
