"""A user's own classifier data (``--config.data.path=FILE.npz``) through an application
binary, as the main job takes it: the contamination audit on a small separable data set,
end to end in a subprocess, writes contamination.json with the documented recall keys for
every compared method and random."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("recall_at_10", "recall_at_100", "perturbed_recall_at_10", "perturbed_recall_at_100")


def _own_npz(path):
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 3.0, size=(3, 6))
    y = rng.integers(0, 3, size=180)
    x = (centres[y] + rng.normal(size=(180, 6))).astype(np.float32)
    np.savez(path, x_train=x[:150], y_train=y[:150], x_query=x[150:], y_query=y[150:])


def test_contamination_binary_on_own_npz(tmp_path):
    data = tmp_path / "own.npz"
    _own_npz(data)
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.contamination",
            f"--workdir={workdir}",
            f"--config.data.path={data}",
            "--config.methods=('stride','graddot')",
            "--config.stride.design.num_subsets=0",
            "--config.apps.contamination.rate=0.2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((workdir / "contamination.json").read_text())
    assert out["num_train_examples"] == 150
    assert out["num_train_examples_contaminated"] == 150 + 2 * len(out["affected_queries"])
    assert len(out["affected_queries"]) == 6  # 0.2 of the 30 queries
    assert set(out["methods"]) == {"stride", "graddot", "random"}
    for name, row in out["methods"].items():
        for key in KEYS:
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
    # recall@100 of 156 examples: a method finding copies at all beats random's expectation
    assert out["methods"]["graddot"]["recall_at_100"] >= out["random_expectation"]["recall_at_100"]
    assert "contamination.json" in proc.stdout
