"""Every config mistake and bad input a user can reach through the binary ends in one line
(``error: ...``, no traceback), a non-zero exit, and no results written; an existing
workdir's results stay as they were."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--config=experiments/configs/digits_quick.py"
LM_QUICK = "--config=experiments/configs/lm_shakespeare_quick.py"
SENTINEL = '{"previous": "results"}'


def _files(tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("x_train,y_train\n1,2\n")
    npy = tmp_path / "one.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    return {"TEXT": str(text), "NPY": str(npy)}


CASES = {
    "unknown key, did you mean": (
        ["--config.stride.design.num_subset=300"],
        "error: unknown config key 'stride.design.num_subset'; did you mean "
        "'stride.design.num_subsets'",
    ),
    "unknown top-level key": (["--config.foo=1"], "error: unknown config key 'foo'; known keys"),
    "missing config file": (["--config=nope.py"], "error: config file 'nope.py' does not exist"),
    "text file named .npz": (
        [QUICK, "--config.data.path=TEXT"],
        "is not an .npz archive (no zip header)",
    ),
    "T the data cannot fill": (
        [QUICK, "--config.stride.design.num_subsets=5000"],
        "error: stride.design.num_subsets=5000 is more than the 400 training rows x degree 5",
    ),
    "unknown STRIDE recovery": (
        [QUICK, "--config.stride.recovery=ridge"],
        "error: stride.recovery must be one of ('lasso', 'kernel', 'solve', 'auto'), got 'ridge'",
    ),
    "LM split larger than the corpus": (
        [LM_QUICK, "--config.data.n_train=100000"],
        "exceeds the 17378 shakespeare blocks; lower them, or leave them unset",
    ),
    "LM block longer than the model": (
        [LM_QUICK, "--config.data.block_len=48"],
        "error: data.block_len=48 exceeds the model's max_len 32",
    ),
    "hf source without a path": (
        [LM_QUICK, "--config.model.source=hf", "--config.data.tokenizer=auto"],
        "error: model.source='hf' needs model.path",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_line_error_and_nothing_written(case, tmp_path):
    args, expected = CASES[case]
    files = _files(tmp_path)
    args = [
        a.replace("=TEXT", "=" + files["TEXT"]).replace("=NPY", "=" + files["NPY"]) for a in args
    ]
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "results.json").write_text(SENTINEL)  # a finished earlier run
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.lds_benchmark", f"--workdir={workdir}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (workdir / "results.json").read_text() == SENTINEL
    assert sorted(os.listdir(workdir)) == ["results.json"]


def test_binary_runs_from_outside_the_repository(tmp_path):
    """The default config path and a repository-relative --config resolve from any directory
    (here the run stops at the first bad override, after the config loaded)."""
    for config in ([], [QUICK]):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.lds_benchmark",
                f"--workdir={tmp_path / 'run'}",
                *config,
                "--config.lds.nboot=3",
            ],
            cwd=str(tmp_path),
            env={**os.environ, "PYTHONPATH": ROOT},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.stderr.strip().splitlines()[-1] == (
            "error: unknown config key 'lds.nboot'; did you mean 'lds.n_boot'"
        )
