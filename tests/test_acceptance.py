"""Issue acceptance on the real default config (minutes): run with `pytest -m slow`."""

import importlib

import pytest

from stride_jax.job import benchmark


@pytest.mark.slow
def test_default_digits_stride_beats_graddot_and_every_ablation_hurts(tmp_path):
    config = importlib.import_module("experiments.configs.digits_ablation").get_config()
    results = benchmark.run(config, str(tmp_path))
    stride, graddot = results["methods"]["stride"], results["methods"]["graddot"]
    assert stride["lds"] >= graddot["lds"]
    for name, entry in results["ablations"].items():
        assert entry["lds"] < stride["lds"], name
        assert entry["delta_vs_stride"]["mean"] < 0, name
