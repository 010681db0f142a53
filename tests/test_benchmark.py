"""End-to-end job on a tiny config: results.json, caching, resume, bad input, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from stride_jax import checkpoint
from stride_jax.data import DataError
from stride_jax.errors import ConfigError
from stride_jax.eval import groundtruth
from stride_jax.job import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from conftest import tiny_config

    workdir = str(tmp_path_factory.mktemp("run"))
    return tiny_config(), workdir, benchmark.run(tiny_config(), workdir)


def test_results_json_schema(finished):
    config, workdir, results = finished
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["dataset"] == {"name": "digits", "n_train": 120, "n_query": 16}
    assert on_disk["ground_truth"] == {"num_models": 8, "alpha": 0.5, "seeds": 1}
    for name in ("stride", "graddot"):
        entry = on_disk["methods"][name]
        lo, hi = entry["lds_ci95"]
        assert -1 <= lo <= entry["lds"] <= hi <= 1
        assert entry["seconds"] > 0
        scores = np.load(os.path.join(workdir, f"scores_{name}.npy"))
        assert scores.shape == (16, 120) and scores.dtype == np.float32
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["stride"]["design"]["num_subsets"] == 40


def test_scores_match_a_direct_lds_of_saved_scores(finished):
    """The LDS in results.json is recomputable from the saved scores and ground truth."""
    from scipy.stats import spearmanr

    _, workdir, results = finished
    gt = checkpoint.load_arrays(os.path.join(workdir, "groundtruth.npz"))
    scores = np.load(os.path.join(workdir, "scores_stride.npy"))
    preds = gt["masks_MxN"].astype(np.float64) @ scores.T.astype(np.float64)
    rho = [spearmanr(preds[:, q], -gt["losses_MxQ"][:, q])[0] for q in range(scores.shape[0])]
    assert results["methods"]["stride"]["lds"] == pytest.approx(np.nanmean(rho), abs=1e-4)
    # graddot's paired difference to STRIDE: the mean over queries valid for both of the
    # per-query difference, recomputed here with scipy.
    other = np.load(os.path.join(workdir, "scores_graddot.npy"))
    preds_o = gt["masks_MxN"].astype(np.float64) @ other.T.astype(np.float64)
    rho_o = [spearmanr(preds_o[:, q], -gt["losses_MxQ"][:, q])[0] for q in range(other.shape[0])]
    diff = np.asarray(rho_o) - np.asarray(rho)
    delta = results["methods"]["graddot"]["delta_vs_stride"]
    assert delta["mean"] == pytest.approx(np.nanmean(diff), abs=1e-4)
    assert delta["ci95"][0] <= delta["mean"] <= delta["ci95"][1]
    assert "delta_vs_stride" not in results["methods"]["stride"]


def test_rerun_reuses_cached_stages(finished, monkeypatch):
    config, workdir, results = finished

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(benchmark, "run_method", forbidden)
    monkeypatch.setattr(groundtruth, "retrain_many", forbidden)
    assert benchmark.run(config, workdir)["methods"] == results["methods"]


def test_killed_run_restarts_to_identical_results(finished, tmp_path, monkeypatch):
    config, _, results = finished
    original = checkpoint.TrainCheckpoints.save

    def save_then_die(self, step, state):
        original(self, step, state)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint.TrainCheckpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        benchmark.run(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
    monkeypatch.setattr(checkpoint.TrainCheckpoints, "save", original)
    again = benchmark.run(config, str(tmp_path))
    for name in ("stride", "graddot"):
        assert again["methods"][name]["lds"] == results["methods"][name]["lds"]
        np.testing.assert_array_equal(
            np.load(tmp_path / f"scores_{name}.npy"),
            np.load(os.path.join(finished[1], f"scores_{name}.npy")),
        )


def _mtimes(workdir, names):
    return {n: os.stat(os.path.join(workdir, n)).st_mtime_ns for n in names}


def test_changed_setting_recomputes_its_stage_and_reuses_the_rest(finished, tmp_path):
    """Stage caches are keyed by the config slice each stage reads: a Lasso setting reruns
    STRIDE's scores only; a base-model setting reruns everything after it; neither is refused."""
    import shutil

    from conftest import tiny_config

    _, done, results = finished
    workdir = str(tmp_path / "w")
    shutil.copytree(done, workdir)
    early = ["base_model.npz", "groundtruth.npz", "scores_graddot.npy"]
    before = _mtimes(workdir, [*early, "scores_stride.npy"])
    config = tiny_config()
    config.stride.lasso.lam_frac *= 2
    again = benchmark.run(config, workdir)
    after = _mtimes(workdir, [*early, "scores_stride.npy"])
    assert {n: after[n] for n in early} == {n: before[n] for n in early}
    assert after["scores_stride.npy"] != before["scores_stride.npy"]
    assert again["methods"]["graddot"]["lds"] == results["methods"]["graddot"]["lds"]
    with open(os.path.join(workdir, "scores_stride.npy.config.json")) as f:
        assert json.load(f)["method"]["lasso"]["lam_frac"] == config.stride.lasso.lam_frac
    config.model.steps = 61  # the base model changes: every later stage is recomputed
    benchmark.run(config, workdir)
    later = _mtimes(workdir, [*early, "scores_stride.npy"])
    assert all(later[n] != after[n] for n in later)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["steps"] == 61


def test_bad_npz_fails_before_any_work(tiny, tmp_path):
    bad = tmp_path / "bad.npz"
    x = np.zeros((10, 3), np.float32)
    x[2, 1] = np.nan
    np.savez(bad, x_train=x, y_train=np.arange(10) % 2, x_query=x[:3] * 0, y_query=[0, 1, 0])
    tiny.data.path = str(bad)
    with pytest.raises(DataError, match="x_train contains NaN"):
        benchmark.run(tiny, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_unknown_method_is_a_config_error(tiny, tmp_path):
    tiny.methods = ("stride", "magic")
    with pytest.raises(ConfigError, match="magic"):
        benchmark.run(tiny, str(tmp_path))


def test_method_for_another_task_kind_is_refused_before_any_work(tiny, tmp_path):
    tiny.methods = ("stride", "bm25")
    with pytest.raises(ConfigError, match="'bm25' supports decoder tasks, not classifier"):
        benchmark.run(tiny, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    tiny.methods = ("stride",)
    tiny.task = "regressor"
    with pytest.raises(ConfigError, match="config.task must be one of"):
        benchmark.run(tiny, str(tmp_path / "out"))


def test_cli_runs_a_decoder_config_and_refuses_it_in_one_line(tmp_path):
    """The one binary takes an LM config; a bad decoder setting is one line, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.lds_benchmark",
            f"--workdir={tmp_path / 'out'}",
            "--config=experiments/configs/lm_shakespeare_quick.py",
            "--config.model.source=pickle",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.source must be")
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_prints_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(
        bad,
        x_train=np.zeros((4, 2)),
        y_train=[0, 1, 0, 1],
        x_query=np.zeros((2, 3)),
        y_query=[0, 1],
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.lds_benchmark",
            f"--workdir={out}",
            f"--config.data.path={bad}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: x_query has 3 features but x_train has 2"
    )
    assert not (out / "results.json").exists()


def test_user_npz_runs_through_the_same_job(tiny, tmp_path):
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm].astype(np.float32), y[perm]
    path = tmp_path / "iris.npz"
    np.savez(
        path,
        x_train=x[:120],
        y_train=y[:120],
        x_query=x[120:],
        y_query=y[120:],
        ids_train=np.arange(1000, 1120),
    )
    tiny.data.path = str(path)
    results = benchmark.run(tiny, str(tmp_path / "out"))
    assert results["dataset"] == {"name": "iris", "n_train": 120, "n_query": 30}
    assert np.load(tmp_path / "out" / "scores_stride.npy").shape == (30, 120)
    assert np.isfinite(results["methods"]["stride"]["lds"])
