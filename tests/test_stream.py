"""Tests for stride_jax.stride.stream (streamed, resumable top-k scoring) and the scale benchmark.

The reference is the dense, non-streamed ``recover.lasso_scores`` on all queries at once,
reduced by numpy (a stable argsort of the full Q x N score matrix).
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.benchmarks import scale
from stride_jax import checkpoint
from stride_jax.stride import recover, stream, subsets

T, N, D, Q, K, B = 256, 2000, 8, 21, 12, 8  # Q not a multiple of B: the last batch is padded
CFG = recover.LassoConfig(lam_frac=0.1, maxiter=50, path_len=4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def problem():
    design = subsets.expander(jax.random.key(0), T, N, D)
    p = scale.ScaleParams(n_train=N, n_query=Q, num_subsets=T, degree=D, nnz=6, noise=0.2)
    return design, scale.responses_fn(design, p)(0, Q)


def _reference_topk(scores_QxN, k):
    """numpy: the k largest positive / most negative scores per query, -1 / 0 padded."""
    order = np.argsort(-scores_QxN, axis=1, kind="stable")[:, :k]
    prop = np.take_along_axis(scores_QxN, order, 1)
    order_n = np.argsort(scores_QxN, axis=1, kind="stable")[:, :k]
    opp = np.take_along_axis(scores_QxN, order_n, 1)
    return {
        "prop_idx_QxK": np.where(prop > 0, order, -1),
        "prop_score_QxK": np.where(prop > 0, prop, 0.0),
        "opp_idx_QxK": np.where(opp < 0, order_n, -1),
        "opp_score_QxK": np.where(opp < 0, opp, 0.0),
    }


def _assert_topk_close(got, ref, scores_QxN):
    """Scores equal to float32 rounding of the batch shape (2e-6 of the largest |score|), and
    each streamed index as good a pick as the reference's: its reference score (0 for the
    padding -1) matches the reference score of that slot, so only near-ties may swap."""
    atol = 2e-6 * np.abs(scores_QxN).max()
    padded_QxN1 = np.concatenate([scores_QxN, np.zeros((len(scores_QxN), 1))], 1)
    for side in ("prop", "opp"):
        idx, score = f"{side}_idx_QxK", f"{side}_score_QxK"
        assert got[idx].shape == (Q, K) and got[idx].dtype == np.int32
        assert got[score].dtype == np.float32
        np.testing.assert_allclose(got[score], ref[score], rtol=0, atol=atol, err_msg=score)
        picked = np.take_along_axis(padded_QxN1, got[idx], 1)  # -1 reads the appended 0
        np.testing.assert_allclose(picked, ref[score], rtol=0, atol=atol, err_msg=idx)
        assert (got[idx] == ref[idx]).mean() > 0.95


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def full_run(problem, tmp_path_factory):
    design, y_QxT = problem
    out_dir = str(tmp_path_factory.mktemp("full"))
    summary = stream.stream_scores(design, y_QxT, CFG, out_dir, K, B, keep_full=True)
    return out_dir, summary


def test_streamed_topk_matches_dense_reference(problem, full_run):
    design, y_QxT = problem
    out_dir, summary = full_run
    assert summary["complete"] and summary["queries_done"] == Q
    assert summary["batches_computed"] == 3 and summary["batches_skipped"] == 0
    dense = recover.lasso_scores(design, y_QxT, CFG)
    scores_QxN = np.asarray(dense["scores_QxN"])
    ref = _reference_topk(scores_QxN, K)
    got = checkpoint.load_arrays(os.path.join(out_dir, stream.TOPK))
    _assert_topk_close(got, ref, scores_QxN)
    assert (got["prop_idx_QxK"] == -1).any()  # sparse Lasso: some slots are padding
    np.testing.assert_allclose(got["lam_Q"], np.asarray(dense["lam_Q"]), rtol=1e-5)
    assert np.abs(got["nnz_Q"] - np.asarray(dense["nnz_Q"])).max() <= 2
    # keep_full: the rows of each batch, unpadded
    full = np.concatenate([np.load(stream.full_path(out_dir, s)) for s in range(0, Q, B)])
    np.testing.assert_allclose(full, scores_QxN, rtol=0, atol=2e-6 * np.abs(scores_QxN).max())


def test_kill_and_resume_give_byte_identical_topk(problem, full_run, tmp_path):
    design, y_QxT = problem
    ref_sha = _sha(os.path.join(full_run[0], stream.TOPK))
    out_dir = str(tmp_path / "resumed")

    # A planned stop after one batch, then a crash from the responses callable in batch 3;
    # the responses come from a callable each time (its tag names them), the reference run
    # read the array: the same numbers either way.
    def responses(start, stop):
        return y_QxT[start:stop]

    def crashing(start, stop):
        if start >= 2 * B:
            raise RuntimeError("killed")
        return y_QxT[start:stop]

    run = dict(num_queries=Q, tag="y")
    first = stream.stream_scores(design, responses, CFG, out_dir, K, B, max_batches=1, **run)
    assert not first["complete"] and first["queries_done"] == B and first["topk_path"] is None
    assert not os.path.exists(os.path.join(out_dir, stream.TOPK))
    with pytest.raises(RuntimeError, match="killed"):
        stream.stream_scores(design, crashing, CFG, out_dir, K, B, **run)
    batches = sorted(f for f in os.listdir(out_dir) if f.startswith("batch_"))
    assert batches == ["batch_000000000.npz", "batch_000000008.npz"]
    with open(os.path.join(out_dir, ".tmp-abc-batch_000000016.npz"), "wb") as f:
        f.write(b"half a file")  # what a kill -9 during a write leaves behind
    resumed = stream.stream_scores(design, responses, CFG, out_dir, K, B, **run)
    assert not any(name.startswith(".tmp-") for name in os.listdir(out_dir))
    assert resumed["complete"] and resumed["batches_skipped"] == 2
    assert resumed["batches_computed"] == 1 and resumed["queries_computed"] == Q - 2 * B
    assert _sha(os.path.join(out_dir, stream.TOPK)) == ref_sha
    again = stream.stream_scores(design, responses, CFG, out_dir, K, B, **run)  # reassembled
    assert again["batches_computed"] == 0 and _sha(again["topk_path"]) == ref_sha


def test_changed_config_is_refused(problem, tmp_path):
    design, y_QxT = problem
    out_dir = str(tmp_path / "run")
    stream.stream_scores(design, y_QxT, CFG, out_dir, K, B, max_batches=1)
    other = dataclasses.replace(CFG, lam_frac=0.05)
    with pytest.raises(checkpoint.CheckpointError, match=r"changed: lasso\.lam_frac\)"):
        stream.stream_scores(design, y_QxT, other, out_dir, K, B)
    with pytest.raises(checkpoint.CheckpointError, match="changed: topk"):
        stream.stream_scores(design, y_QxT, CFG, out_dir, K + 1, B)
    with pytest.raises(checkpoint.CheckpointError, match="responses.sha256"):
        stream.stream_scores(design, y_QxT + 1.0, CFG, out_dir, K, B)


def test_bad_arguments_are_one_line_errors(problem, tmp_path):
    design, y_QxT = problem
    out = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="num_queries is required"):
        stream.stream_scores(design, lambda s, e: y_QxT[s:e], CFG, out, K, B)
    with pytest.raises(ValueError, match=r"topk must be in \[1, N=2000\]"):
        stream.stream_scores(design, y_QxT, CFG, out, N + 1, B)
    with pytest.raises(ValueError, match=r"responses must be \(Q, T=256\)"):
        stream.stream_scores(design, y_QxT[:, :10], CFG, out, K, B)
    with pytest.raises(ValueError, match=r"have shape \(8, 3\), expected \(8, 256\)"):
        stream.stream_scores(
            design, lambda s, e: np.zeros((e - s, 3)), CFG, out, K, B, num_queries=Q
        )


def test_top_signed_padding_and_ties():
    scores = np.array([[0.0, 2.0, -1.0, 2.0, -0.0, 0.5]], np.float32)
    got = jax.device_get(stream.top_signed(scores, 4))
    np.testing.assert_array_equal(got["prop_idx"], [[1, 3, 5, -1]])  # tie: lower index first
    np.testing.assert_array_equal(got["prop_score"], [[2.0, 2.0, 0.5, 0.0]])
    np.testing.assert_array_equal(got["opp_idx"], [[2, -1, -1, -1]])  # -0.0 is not negative
    np.testing.assert_array_equal(got["opp_score"], [[-1.0, 0.0, 0.0, 0.0]])


def test_recovery_is_near_perfect_when_t_exceeds_n(tmp_path):
    """Sanity of the design + Lasso + recovery measures: T >= N, no noise, converged."""
    p = scale.ScaleParams(
        n_train=200, n_query=8, num_subsets=256, degree=8, topk=10, nnz=5, noise=0.0,
        lam_frac=0.01, maxiter=300, path_len=4,
    )  # fmt: skip
    res = scale.run(p, str(tmp_path))
    rec = res["recovery"]
    assert rec["recall_at_k"] == 1.0 and rec["precision_at_nnz"] == 1.0, rec
    assert rec["precision_at_k"] >= 0.9, rec
    again = scale.run(p, str(tmp_path))  # a rerun on the same workdir resumes: all on disk
    assert again["queries_computed_this_run"] == 0 and again["recovery"] == rec


@pytest.mark.slow  # the benchmark binary; the streaming it runs is tested above
def test_benchmark_entry_point_writes_scale_json(tmp_path):
    workdir = str(tmp_path / "scale")
    cmd = [sys.executable, "-m", "experiments.benchmarks.scale", "--n_train=3000", "--n_query=10"]
    cmd += ["--num_subsets=128", "--degree=4", "--topk=5", "--nnz=3", "--query_batch=4"]
    cmd += ["--maxiter=20", "--path_len=2", f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "10/10 queries" in proc.stdout
    with open(os.path.join(workdir, "scale.json")) as f:
        res = json.load(f)
    for key in ("n_train", "n_query", "T", "degree", "topk", "queries_done", "machine"):
        assert key in res
    assert (res["n_train"], res["n_query"], res["T"], res["queries_done"]) == (3000, 10, 128, 10)
    assert res["peak_rss_mb"]["ru_maxrss"] > 0 and res["peak_rss_mb"]["sampled_during_run"] > 0
    assert res["seconds"]["total"] > 0 and res["seconds"]["stream_lasso"] > 0
    assert set(res["recovery"]) >= {"recall_at_k", "precision_at_k", "precision_at_nnz"}
    assert res["machine"]["cpu_model"] is not None and res["machine"]["jax"] == jax.__version__
    # A changed setting on the same workdir is one line, not a traceback
    proc = subprocess.run(cmd + ["--noise=0.5"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "responses.tag.noise" in proc.stderr
