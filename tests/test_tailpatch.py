"""Tail-patch: the vectorised one-step deltas against a plain per-set loop (optax SGD on the
subset's mean loss), example-to-row padding for chunked decoder examples, a tiny end-to-end
run, and bad settings refused before any training (in process and through the binary)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stride_jax.apps import tailpatch
from stride_jax.data import TokenBlocks, corpora, load_digits
from stride_jax.errors import ConfigError
from stride_jax.job.config import base_config
from stride_jax.models import mlp, transformer
from stride_jax.tasks import mlp_task
from stride_jax.tasks.decoder_task import DecoderTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTINEL = '{"previous": "results"}'


def _reference(task, params, query_rows, lr):
    """``delta(q, rows)``: one optax SGD step on the mean loss of the training rows ``rows``,
    then the change of query row q's loss (jitted: an eager transformer gradient is slow)."""

    @jax.jit
    def delta(batch, one):
        grads = jax.grad(lambda p: jnp.mean(task.loss(p, batch)))(params)
        tx = optax.sgd(lr)
        updates, _ = tx.update(grads, tx.init(params), params)
        stepped = optax.apply_updates(params, updates)
        return task.loss(params, one)[0] - task.loss(stepped, one)[0]

    def one(q, rows):
        batch = task.arrays(task.train.subset(rows))
        return float(delta(batch, task.arrays(query_rows.subset([q]))))

    return one


def _classifier():
    splits = load_digits(n_train=50, n_query=6)
    model = base_config("classifier").model
    model.update(hidden=(16,), steps=30)
    graphdef, _ = mlp.abstract(model, 64, splits.num_classes)
    task = mlp_task(model, graphdef, None, splits)
    return task, task.retrain(jax.random.key(0)), splits


def test_classifier_deltas_match_a_plain_sgd_loop():
    task, params, splits = _classifier()
    sets_PxK = np.array([[0, 1, 2], [7, 3, 9], [49, 20, 11], [5, 5, 6]])
    q_P = np.array([0, 5, 2, 3])
    idx, w = tailpatch.set_rows(tailpatch.example_rows(task), sets_PxK)
    got = tailpatch.step_deltas(task, params, splits.query, 0.5, q_P, idx, w)
    reference = _reference(task, params, splits.query, 0.5)
    ref = [reference(q, s) for q, s in zip(q_P, sets_PxK, strict=True)]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)
    assert np.all(np.abs(ref) > 1e-5)  # the step moves the query's loss measurably


def _chunked_decoder():
    sp = corpora.load_shakespeare(block_len=16, n_train=10, n_val=0, n_query=3, seed=0)
    ids = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])  # examples of 2, 1, 3, 1, 2, 1 rows
    t = sp.train
    train = TokenBlocks(
        t.tokens_NxL, t.loss_mask_NxL, t.attn_mask_NxL, ids, tuple(f"ex{i}" for i in range(6))
    )
    cfg = transformer.DecoderConfig(
        family="gpt2",
        vocab_size=sp.tokenizer.vocab_size,
        d_model=16,
        n_layers=1,
        n_heads=2,
        max_len=16,
    )
    graphdef, params = transformer.build(cfg, jax.random.key(0))
    task = DecoderTask(graphdef=graphdef, params=params, train=train, query=sp.query)
    task.model_config = cfg
    return task, sp


def test_decoder_rows_are_padded_with_weight_zero_and_deltas_match_the_loop():
    task, sp = _chunked_decoder()
    rows_ExR = tailpatch.example_rows(task)
    np.testing.assert_array_equal(
        rows_ExR,
        [[0, 1, -1], [2, -1, -1], [3, 4, 5], [6, -1, -1], [7, 8, -1], [9, -1, -1]],
    )
    sets_PxK = np.array([[0, 2], [1, 3], [5, 4]])
    idx, w = tailpatch.set_rows(rows_ExR, sets_PxK)
    assert idx.shape == w.shape == (3, 6)
    np.testing.assert_array_equal(w.sum(1), [5, 2, 3])
    q_P = np.array([0, 2, 1])
    got = tailpatch.step_deltas(task, task.params, sp.query, 0.3, q_P, idx, w)
    reference = _reference(task, task.params, sp.query, 0.3)
    for p in (0, 1):  # 5 and 2 of the 6 row slots filled (one compilation per row count)
        rows = np.flatnonzero(np.isin(task.train.example_id_N, sets_PxK[p]))
        np.testing.assert_allclose(got[p], reference(q_P[p], rows), rtol=1e-3, atol=1e-6)


def test_top_bottom_and_random_sets():
    scores = np.array([[0.1, 0.5, -0.2, 0.5, 0.0], [3.0, 2.0, 1.0, 0.0, -1.0]])
    top, bottom = tailpatch.top_bottom(scores, 2)
    np.testing.assert_array_equal(top, [[1, 3], [0, 1]])
    np.testing.assert_array_equal(bottom, [[2, 4], [4, 3]])
    sets = tailpatch.random_sets(jax.random.key(0), 50, 8, 3)
    assert sets.shape == (50, 3) and all(len(set(s)) == 3 for s in sets.tolist())
    assert sets.min() >= 0 and sets.max() < 8


def test_tiny_classifier_end_to_end(tiny, tmp_path):
    tiny.methods = ("graddot",)
    tiny.apps.tailpatch.update(ks=(5, 10), num_queries=8, random_draws=2, lr=0.05)
    r = tailpatch.run(tiny, str(tmp_path))
    assert json.loads((tmp_path / "tailpatch.json").read_text()) == r
    assert len(r["queries"]) == 8 and len(set(r["queries"])) == 8
    assert sorted(r["methods"]) == ["graddot", "random"]
    for by_k in r["methods"].values():
        assert sorted(by_k) == ["10", "5"]
        for entry in by_k.values():
            for part in ("top", "bottom", "random", "lift"):
                lo, hi = entry[part]["ci95"]
                assert lo <= entry[part]["mean"] <= hi
            lift = entry["top"]["mean"] - entry["random"]["mean"]
            assert entry["lift"]["mean"] == pytest.approx(lift, rel=1e-6, abs=1e-12)
    # Gradient-dot ranks examples by the first-order change a step on them makes.
    g = r["methods"]["graddot"]["5"]
    assert g["lift"]["ci95"][0] > 0 and g["bottom"]["mean"] < g["random"]["mean"]
    assert r["methods"]["random"]["5"]["random"] == g["random"]  # one set of random draws


BAD = {
    "num_queries above the queries": ({"num_queries": 17}, "config.apps.tailpatch.num_queries"),
    "k above the training examples": ({"ks": (500,)}, "config.apps.tailpatch.ks"),
    "lr 0": ({"lr": 0.0}, "config.apps.tailpatch.lr"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_are_refused_before_any_training(case, tiny, tmp_path):
    values, key = BAD[case]
    tiny.apps.tailpatch.update(**values)
    with pytest.raises(ConfigError, match=key):
        tailpatch.run(tiny, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_method_of_another_kind_is_refused_naming_the_key(tiny, tmp_path):
    tiny.apps.methods = ("graddot", "tfidf")
    with pytest.raises(ConfigError, match="config.apps.methods: method 'tfidf' supports decoder"):
        tailpatch.run(tiny, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_binary_one_line_error_and_json_untouched(tmp_path):
    (tmp_path / "tailpatch.json").write_text(SENTINEL)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.tailpatch",
            f"--workdir={tmp_path}",
            "--config.apps.tailpatch.num_queries=51",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: config.apps.tailpatch.num_queries must be in 0..50")
    assert (tmp_path / "tailpatch.json").read_text() == SENTINEL
    assert os.listdir(tmp_path) == ["tailpatch.json"]


def test_tiny_decoder_end_to_end(tmp_path):
    """The decoder path (lm_shakespeare_quick without STRIDE; about 10 s)."""
    from experiments.configs import lm_shakespeare_quick

    config = lm_shakespeare_quick.get_config()
    config.methods = ("graddot",)
    config.apps.tailpatch.update(ks=(4,), random_draws=2)
    r = tailpatch.run(config, str(tmp_path))
    assert len(r["queries"]) == 8 and r["num_train_examples"] == 64
    g = r["methods"]["graddot"]["4"]
    assert g["top"]["mean"] > g["random"]["mean"] > g["bottom"]["mean"]
