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
