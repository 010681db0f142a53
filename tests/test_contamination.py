"""The contamination audit: copy ranks against a brute-force sort, the injected rows (exact
copies bitwise, perturbed copies bounded and only where the task perturbs), a tiny end-to-end
run, and bad settings refused before any training (in process and through the binary)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from stride_jax.apps import contamination
from stride_jax.data import corpora, load_digits
from stride_jax.errors import ConfigError
from stride_jax.job.config import base_config
from stride_jax.models import transformer
from stride_jax.tasks import mlp_task
from stride_jax.tasks.decoder_task import DecoderTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTINEL = '{"previous": "results"}'


def _brute_ranks(s_E, copy):
    """Top and bottom ranks by sorting, ties placed ahead of the copy (pessimistic)."""
    others = np.delete(s_E, copy)
    desc = sorted([(-v, 0) for v in others] + [(-s_E[copy], 1)])
    asc = sorted([(v, 0) for v in others] + [(s_E[copy], 1)])
    return [p for p, (_, c) in enumerate(desc, 1) if c][0], [
        p for p, (_, c) in enumerate(asc, 1) if c
    ][0]


def test_copy_ranks_and_recall_match_a_brute_force_sort():
    rng = np.random.default_rng(0)
    scores_QxE = rng.integers(-3, 4, size=(12, 30)).astype(np.float32)  # many ties
    queries_A, copies_A = np.array([0, 3, 4, 7, 11]), np.array([5, 29, 0, 12, 5])
    top_A, bottom_A = contamination.copy_ranks(scores_QxE, queries_A, copies_A)
    ref = np.array(
        [_brute_ranks(scores_QxE[q], c) for q, c in zip(queries_A, copies_A, strict=True)]
    )
    np.testing.assert_array_equal(top_A, ref[:, 0])
    np.testing.assert_array_equal(bottom_A, ref[:, 1])
    got = contamination.recall(top_A, bottom_A, (1, 5, 10))
    for k in (1, 5, 10):
        top, bottom = ref[:, 0] <= k, ref[:, 1] <= k
        assert got[f"recall_at_{k}"] == pytest.approx(top.mean())
        assert got[f"bottom_recall_at_{k}"] == pytest.approx(bottom.mean())
        assert got[f"union_recall_at_{k}"] == pytest.approx((top | bottom).mean())
    assert got["median_rank"] == np.median(ref[:, 0]) and got["mean_rank"] == ref[:, 0].mean()


def test_a_score_that_finds_the_copy_has_recall_one_and_ties_find_nothing():
    q, e = 6, 40
    affected, exact, perturbed = np.array([1, 4]), np.array([36, 37]), np.array([38, 39])
    scores = np.random.default_rng(1).normal(size=(q, e)).astype(np.float32)
    scores[affected, exact] = 10.0  # the exact copy first
    scores[affected, perturbed] = -10.0  # the perturbed copy last
    r = contamination.method_report(scores, affected, exact, perturbed, (1, 10))
    assert r["recall_at_1"] == r["recall_at_10"] == r["union_recall_at_1"] == 1.0
    assert r["bottom_recall_at_10"] == 0.0 and r["median_rank"] == 1.0
    assert r["perturbed_recall_at_10"] == 0.0 and r["perturbed_bottom_recall_at_1"] == 1.0
    assert r["perturbed_union_recall_at_1"] == 1.0 and r["perturbed_median_rank"] == e
    zero = contamination.method_report(np.zeros((q, e)), affected, exact, perturbed, (10,))
    assert zero["union_recall_at_10"] == 0.0 and zero["copy_score_zero_frac"] == 1.0


def test_affected_queries_are_seeded_distinct_and_at_least_one():
    key = jax.random.key(3)
    a = contamination.affected_queries(50, 0.2, key)
    np.testing.assert_array_equal(a, contamination.affected_queries(50, 0.2, key))
    assert len(a) == 10 and len(set(a.tolist())) == 10 and list(a) == sorted(a)
    assert len(contamination.affected_queries(5, 0.01, key)) == 1


def _classifier_task():
    splits = load_digits(n_train=60, n_query=10)
    return mlp_task(base_config("classifier").model, None, None, splits), splits


def test_classifier_copies_are_exact_and_perturbed_copies_bounded():
    task, splits = _classifier_task()
    affected = np.array([2, 5, 9])
    train, exact, pert = contamination.inject(task, splits.query, affected, 0.1, jax.random.key(0))
    assert len(train) == 66 and list(exact) == [60, 61, 62] and list(pert) == [63, 64, 65]
    np.testing.assert_array_equal(train.x_NxF[:60], splits.train.x_NxF)
    assert train.x_NxF[exact].tobytes() == splits.query.x_NxF[affected].tobytes()
    np.testing.assert_array_equal(train.y_N[exact], splits.query.y_N[affected])
    np.testing.assert_array_equal(train.y_N[pert], splits.query.y_N[affected])
    diff = train.x_NxF[pert] - splits.query.x_NxF[affected]
    std_F = splits.train.x_NxF.std(0)
    assert np.all(diff != 0) or np.mean(diff != 0) > 0.5  # zero-variance pixels stay put
    assert np.all(np.abs(diff) <= 0.1 * 6 * std_F + 1e-6)  # 6 standard deviations of noise
    ids = list(train.ids_N)
    assert ids[60:] == [f"copy:{i}" for i in splits.query.ids_N[affected]] + [
        f"perturbed:{i}" for i in splits.query.ids_N[affected]
    ]
    assert len(set(map(str, ids))) == len(ids)


def test_decoder_copies_keep_vocab_and_change_only_target_tokens():
    sp = corpora.load_shakespeare(block_len=16, n_train=20, n_val=0, n_query=6, seed=0)
    cfg = transformer.DecoderConfig(
        family="gpt2",
        vocab_size=sp.tokenizer.vocab_size,
        d_model=8,
        n_layers=1,
        n_heads=2,
        max_len=16,
    )
    task = DecoderTask(graphdef=None, params=None, train=sp.train, query=sp.query, model_config=cfg)
    affected = np.array([0, 3, 4])
    train, exact, pert = contamination.inject(task, sp.query, affected, 0.25, jax.random.key(1))
    assert train.num_examples == 26 and list(exact) == [20, 21, 22] and list(pert) == [23, 24, 25]
    rows_of = {e: np.flatnonzero(train.example_id_N == e) for e in range(train.num_examples)}
    for j, q in enumerate(affected):
        (ex,), (pe,) = rows_of[exact[j]], rows_of[pert[j]]
        np.testing.assert_array_equal(train.tokens_NxL[ex], sp.query.tokens_NxL[q])
        tokens, orig = train.tokens_NxL[pe], sp.query.tokens_NxL[q]
        changed = tokens != orig
        target = sp.query.loss_mask_NxL[q] > 0
        assert changed.any() and not (changed & ~target).any()
        assert tokens.min() >= 0 and tokens.max() < cfg.vocab_size
        assert changed.sum() <= round(0.25 * target.sum())
        np.testing.assert_array_equal(train.loss_mask_NxL[pe], sp.query.loss_mask_NxL[q])
        key = sp.query.example_keys[sp.query.example_id_N[q]]
        assert train.example_keys[exact[j]] == f"copy:{key}"
        assert train.example_keys[pert[j]] == f"perturbed:{key}"
    assert len(set(train.example_keys)) == train.num_examples


def test_tiny_classifier_end_to_end(tiny, tmp_path):
    tiny.methods = ("graddot",)
    tiny.apps.contamination.update(rate=0.25, ks=(5, 20), noise=0.1)
    r = contamination.run(tiny, str(tmp_path))
    assert json.loads((tmp_path / "contamination.json").read_text()) == r
    assert sorted(r["methods"]) == ["graddot", "random"]
    assert len(r["affected_queries"]) == 4
    assert r["num_train_examples"] == 120 and r["num_train_examples_contaminated"] == 128
    assert r["random_expectation"]["recall_at_5"] == pytest.approx(5 / 128)
    assert r["random_expectation"]["union_recall_at_20"] == pytest.approx(40 / 128)
    for m in r["methods"].values():
        for p in ("", "perturbed_"):
            for k in (5, 20):
                top, union = m[f"{p}recall_at_{k}"], m[f"{p}union_recall_at_{k}"]
                assert 0 <= top <= union <= 1
            assert 1 <= m[f"{p}median_rank"] <= 128
    assert r["methods"]["graddot"]["recall_at_20"] > r["random_expectation"]["recall_at_20"]
    mem = r["memorisation"]["contaminated_model"]
    assert set(mem["affected"]) == {"loss", "accuracy"}
    assert mem["affected"]["loss"] < r["memorisation"]["base_model"]["affected"]["loss"]
    assert os.path.isdir(r["workdir"]) and os.path.dirname(r["workdir"]) == str(tmp_path)
    assert os.path.exists(os.path.join(r["workdir"], "base_model.npz"))
    # Another rate is another contaminated model, in another directory.
    d1 = contamination.digest(0.25, 0.1, 0)
    assert r["workdir"].endswith(d1) and contamination.digest(0.3, 0.1, 0) != d1


BAD = {
    "rate above 1": ({"rate": 1.5}, "config.apps.contamination.rate"),
    "rate 0": ({"rate": 0.0}, "config.apps.contamination.rate"),
    "k above the training examples": ({"ks": (5, 500)}, "config.apps.contamination.ks"),
    "negative noise": ({"noise": -1.0}, "config.apps.contamination.noise"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_are_refused_before_any_training(case, tiny, tmp_path):
    values, key = BAD[case]
    tiny.apps.contamination.update(**values)
    with pytest.raises(ConfigError, match=key):
        contamination.run(tiny, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_method_is_refused_naming_the_key(tiny, tmp_path):
    tiny.apps.methods = ("graddot", "nope")
    with pytest.raises(ConfigError, match="config.apps.methods: unknown attribution method"):
        contamination.run(tiny, str(tmp_path))


def test_binary_one_line_error_and_json_untouched(tmp_path):
    (tmp_path / "contamination.json").write_text(SENTINEL)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.contamination",
            f"--workdir={tmp_path}",
            "--config.apps.contamination.rate=1.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert lines[-1] == "error: config.apps.contamination.rate must be in (0, 1), got 1.5"
    assert (tmp_path / "contamination.json").read_text() == SENTINEL
    assert os.listdir(tmp_path) == ["contamination.json"]


def test_tiny_decoder_end_to_end(tmp_path):
    """The decoder path (lm_shakespeare_quick without STRIDE): TF-IDF finds every exact copy
    of the leaked text first (about 10 s)."""
    from experiments.configs import lm_shakespeare_quick

    config = lm_shakespeare_quick.get_config()
    config.methods = ("graddot", "tfidf")
    config.apps.contamination.update(rate=0.5, ks=(4, 16), token_frac=0.2)
    r = contamination.run(config, str(tmp_path))
    assert r["num_train_examples"] == 64 and r["num_train_examples_contaminated"] == 72
    assert r["methods"]["tfidf"]["recall_at_4"] == 1.0
    assert r["methods"]["tfidf"]["median_rank"] == 1.0
    assert set(r["memorisation"]["contaminated_model"]["affected"]) == {"loss"}
