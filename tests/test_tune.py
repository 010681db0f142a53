"""The tuning binary scores on validation queries and writes one row per grid point."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tune_grid_on_validation_queries(tmp_path):
    args = [
        sys.executable,
        "-m",
        "experiments.tune",
        f"--workdir={tmp_path}",
        "--config=experiments/configs/digits_quick.py",
        "--method=kfac",
        "--config.groundtruth.num_models=8",
        "--config.groundtruth.models_per_batch=8",
        "--config.groundtruth.noise_ceiling=False",
        "--sweep=damping=1e-3,1e-2",
    ]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "tuning_kfac.json") as f:
        rows = json.load(f)
    assert [r["point"] for r in rows] == [{"damping": 1e-3}, {"damping": 1e-2}]
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["data"]["query_split"] == "val"
    assert all(-1 <= r["lds"] <= 1 for r in rows)


def test_sweep_values_keep_the_type_of_the_setting():
    import ml_collections

    from stride_jax.job import cli

    axes = cli.parse_sweep(["fisher=true,empirical", "damping=0.1,1e-3", "flag=true"])
    c = ml_collections.ConfigDict(dict(fisher="empirical", damping=1.0, flag=False))
    for key, values in axes:
        for v in values:
            cli.set_path(c, key, v)  # ml_collections refuses a value of another type
    assert c.fisher == "empirical" and c.damping == 1e-3 and c.flag is True
    cli.set_path(c, "fisher", axes[0][1][0])
    assert c.fisher == "true"  # the string, not the bool True
