"""Data selection (stride_jax.apps.selection): the aggregation rules against brute-force
loops (ties included), the selection sizes, a run on a tiny digits task checked against
direct retrains, and bad settings refused before any training (in process and through the
binary: one line, non-zero exit, an earlier selection.json untouched)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.stats
from conftest import tiny_config

from stride_jax.apps import run as apps_run
from stride_jax.apps import selection
from stride_jax.errors import ConfigError

pytestmark = pytest.mark.xdist_group("apps_selection")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def greedy_reference(scores):
    """Plain loops: per query, rank 1 = highest score (ties: lower index first); each
    example's best rank; order by best rank, then index."""
    q, e = len(scores), len(scores[0])
    best = [e + 1] * e
    for i in range(q):
        ranked = sorted(range(e), key=lambda j, i=i: (-scores[i][j], j))
        for rank, j in enumerate(ranked, start=1):
            best[j] = min(best[j], rank)
    return sorted(range(e), key=lambda j: (best[j], j))


def mean_reference(scores):
    q, e = len(scores), len(scores[0])
    means = [sum(scores[i][j] for i in range(q)) / q for j in range(e)]
    return sorted(range(e), key=lambda j: (-means[j], j))


@pytest.mark.parametrize("seed", range(6))
def test_rank_rules_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    q, e = rng.integers(1, 6), rng.integers(2, 30)
    scores = rng.integers(-3, 4, size=(q, e)).astype(np.float32)  # many ties
    assert selection.rank_greedy(scores).tolist() == greedy_reference(scores.tolist())
    assert selection.rank_mean(scores).tolist() == mean_reference(scores.tolist())


def test_greedy_prefers_a_specialist_and_mean_a_generalist():
    # Example 0 is first for query 0 only; example 2 is second for both.
    scores = [[9.0, 0.0, 5.0, 1.0], [0.0, 9.0, 5.0, 1.0], [0.0, 0.0, 5.0, 9.0]]
    assert selection.rank_greedy(scores).tolist() == [0, 1, 3, 2]
    assert selection.rank_mean(scores).tolist() == [2, 3, 0, 1]
    # Equal scores everywhere: the index order.
    assert selection.rank_greedy(np.zeros((3, 5))).tolist() == [0, 1, 2, 3, 4]
    # NaN ranks last.
    assert selection.rank_greedy([[np.nan, 1.0, 0.0]]).tolist() == [1, 2, 0]


def test_select_sizes():
    order = np.random.default_rng(0).permutation(17)
    for k in range(18):
        mask = selection.select(order, k)
        assert mask.dtype == bool and mask.sum() == k
        assert set(np.flatnonzero(mask)) == set(order[:k].tolist())
    with pytest.raises(ValueError, match="k must be in 0..17"):
        selection.select(order, 18)


def test_mean_ci95_is_the_t_interval():
    v = [0.3, 0.5, 0.4, 0.9]
    lo, hi = scipy.stats.t.interval(0.95, 3, loc=np.mean(v), scale=scipy.stats.sem(v))
    got = selection.mean_ci95(v)
    assert got["mean"] == pytest.approx(np.mean(v))
    assert got["ci95"] == pytest.approx([lo, hi])


def _cfg(**overrides):
    c = tiny_config().apps.selection
    c.update(fractions=(0.25,), aggregate=("greedy", "mean"), random_draws=2, seed=3)
    c.update(**overrides)
    return c


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"fractions": (0.0,)}, "config.apps.selection.fractions must be in (0, 1), got 0.0"),
        ({"fractions": (0.5, 1.0)}, "config.apps.selection.fractions must be in (0, 1)"),
        ({"fractions": ()}, "config.apps.selection.fractions is empty"),
        ({"fractions": (0.001,)}, "fractions has 0.001: of 120 training examples it keeps 0"),
        ({"aggregate": ("max",)}, "config.apps.selection.aggregate must name rules"),
        ({"random_draws": 1}, "config.apps.selection.random_draws must be an integer >= 2"),
    ],
)
def test_check_names_the_bad_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        selection.check(_cfg(**overrides), 120)
    assert message in str(e.value)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = tiny_config()
    config.methods = ("graddot",)
    ctx = apps_run.open_run(config, str(tmp_path_factory.mktemp("selection")))
    scores = apps_run.scores(ctx, ["graddot"])
    return ctx, scores, selection.run(ctx, {**scores, "random": scores["graddot"]}, _cfg())


def _direct(ctx, k, mask_E):
    """Mean loss and accuracy of a model retrained directly with the size's key."""
    key = jax.random.split(jax.random.fold_in(jax.random.key(3), k))[0]
    params = ctx.task.retrain(key, mask_E.astype(np.float32))
    m = ctx.task.row_metrics(ctx.splits.query, params)
    return float(m["loss"].mean()), float(m["correct"].mean())


def test_run_structure_and_direct_retrains(tiny_run):
    ctx, scores, res = tiny_run
    assert res["methods"] == ["graddot"] and res["num_examples"] == 120
    (block,) = res["fractions"]
    assert (block["fraction"], block["k"]) == (0.25, 30)
    assert set(block["methods"]) == {"graddot"}  # "random" scores are not a method here
    assert set(block["methods"]["graddot"]) == {"greedy", "mean"}
    # The full-data reference is task.retrain with all ones (the size's key).
    loss, acc = _direct(ctx, 30, np.ones(120))
    assert block["full"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert block["full"]["accuracy"] == pytest.approx(acc)
    # The greedy selection's model is task.retrain on exactly the 30 greedy-ranked examples.
    order = greedy_reference(scores["graddot"].tolist())
    mask = np.zeros(120)
    mask[order[:30]] = 1
    loss, acc = _direct(ctx, 30, mask)
    greedy = block["methods"]["graddot"]["greedy"]
    assert greedy["loss"] == pytest.approx(loss, rel=1e-5)
    assert greedy["accuracy"] == pytest.approx(acc)
    # Random: the CI is the t-interval of its draws; the comparisons follow from the numbers.
    rnd = block["random"]
    draws = [d["loss"] for d in rnd["draws"]]
    assert len(draws) == 2 and rnd["loss"] == selection.mean_ci95(draws)
    for r in block["methods"]["graddot"].values():
        assert r["loss_vs_random"] == pytest.approx(r["loss"] - rnd["loss"]["mean"])
        assert r["beats_random"] == (r["loss"] < rnd["loss"]["ci95"][0])
        assert r["beats_random_accuracy"] == (r["accuracy"] > rnd["accuracy"]["ci95"][1])
    assert "fraction 0.25: k=30 of 120" in selection.format_table(res)


def test_job_refuses_bad_settings_before_training(tmp_path):
    config = tiny_config()
    config.apps.methods = ("nosuch",)
    with pytest.raises(
        ConfigError, match="config.apps.methods: unknown attribution method 'nosuch'"
    ):
        selection.job(config, str(tmp_path / "a"))
    config = tiny_config()
    config.apps.selection.fractions = (1.5,)
    with pytest.raises(ConfigError, match="fractions must be in"):
        selection.job(config, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a" / "base_model.npz")
    assert not os.path.exists(tmp_path / "b")


def test_binary_one_line_error_and_selection_json_untouched(tmp_path):
    (tmp_path / "selection.json").write_text(json.dumps({"previous": 1}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.selection",
            f"--workdir={tmp_path}",
            "--config.apps.selection.fractions=(0.1,1.2)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert lines[-1] == "error: config.apps.selection.fractions must be in (0, 1), got 1.2"
    assert json.loads((tmp_path / "selection.json").read_text()) == {"previous": 1}
    assert sorted(os.listdir(tmp_path)) == ["selection.json"]
