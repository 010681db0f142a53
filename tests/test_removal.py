"""Top-k removal (stride_jax.apps.removal): top-k and masks against plain loops (ties
included), a run on a tiny digits task whose rises are recomputed with a direct loop of
``task.retrain`` + ``row_metrics``, and bad settings refused before any training (in process
and through the binary: one line, non-zero exit, an earlier removal.json untouched)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config

from stride_jax.apps import removal
from stride_jax.apps import run as apps_run
from stride_jax.errors import ConfigError
from stride_jax.eval import metrics

pytestmark = pytest.mark.xdist_group("apps_removal")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_k_and_masks_match_loops_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(4, 9)).astype(np.float32)
    for k in (1, 4, 8):
        removed = removal.top_k(scores, k)
        masks = removal.removal_masks(removed, 9)
        for v, row in enumerate(scores.tolist()):
            expected = sorted(range(9), key=lambda j, row=row: (-row[j], j))[:k]
            assert removed[v].tolist() == expected
            assert [j for j in range(9) if masks[v, j] == 0] == sorted(expected)


def _cfg(**overrides):
    c = tiny_config().apps.removal
    c.update(ks=(5,), num_queries=2, seeds=2, seed=1)
    c.update(**overrides)
    return c


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ks": (5, 0)}, "config.apps.removal.ks has 0: each must be in 1..119"),
        ({"ks": (120,)}, "config.apps.removal.ks has 120: each must be in 1..119"),
        ({"ks": ()}, "config.apps.removal.ks is empty"),
        ({"num_queries": 17}, "config.apps.removal.num_queries has 17: each must be in 1..16"),
        ({"seeds": 0}, "config.apps.removal.seeds must be an integer >= 1, got 0"),
    ],
)
def test_check_names_the_bad_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        removal.check(_cfg(**overrides), 120, 16)
    assert message in str(e.value)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = tiny_config()
    config.methods = ("graddot",)
    ctx = apps_run.open_run(config, str(tmp_path_factory.mktemp("removal")))
    scores = apps_run.scores(ctx, ["graddot"])
    return ctx, scores, removal.run(ctx, scores, _cfg())


def _direct_losses(ctx, removed, query):
    """The query's loss under each seed's retrain without ``removed`` (a plain loop)."""
    keys = jax.random.split(jax.random.split(jax.random.key(1), 3)[2], 2)
    weights = np.ones(ctx.task.num_examples, np.float32)
    weights[list(removed)] = 0.0
    rows = ctx.splits.query.subset([query])
    return np.array(
        [ctx.task.row_metrics(rows, ctx.task.retrain(k, weights))["loss"][0] for k in keys]
    )


def test_rise_matches_a_direct_retrain_loop(tiny_run):
    ctx, scores, res = tiny_run
    queries = res["queries"]
    assert len(queries) == 2 and len(set(queries)) == 2 and res["ks"] == [5]
    assert res["num_retrains"] == (2 * 2 + 1) * 2  # (graddot, random) x 2 queries + full
    g, rnd = res["methods"]["graddot"]["5"], res["random"]["5"]
    for v, q in enumerate(queries):
        expected = sorted(range(120), key=lambda j, q=q: (-scores["graddot"][q][j], j))[:5]
        assert g["removed"][v] == expected
        assert len(set(rnd["removed"][v])) == 5
    full = np.stack([_direct_losses(ctx, [], q) for q in queries])  # V x S
    drops = []
    for v, q in enumerate(queries):
        after = _direct_losses(ctx, g["removed"][v], q)
        assert g["per_query_rise"][v] == pytest.approx((after - full[v]).mean(), abs=1e-4)
        drops.append((np.exp(-full[v]) - np.exp(-after)).mean())
    assert g["prob_drop"]["mean"] == pytest.approx(np.mean(drops), abs=1e-4)
    after = _direct_losses(ctx, rnd["removed"][0], queries[0])  # one random removal too
    assert rnd["per_query_rise"][0] == pytest.approx((after - full[0]).mean(), abs=1e-4)
    assert res["full"]["loss"] == pytest.approx(full.mean(), abs=1e-5)
    assert res["full"]["prob"] == pytest.approx(np.exp(-full).mean(), abs=1e-5)
    # The summaries are the paired statistics of the per-query numbers.
    paired = metrics.paired_difference(g["per_query_rise"], rnd["per_query_rise"])
    assert g["rise_vs_random"] == pytest.approx(paired)
    assert g["beats_random"] == (paired["ci95"][0] > 0)
    assert "top-k removal: 2 queries x 2 seeds" in removal.format_table(res)


def test_job_refuses_bad_settings_before_training(tmp_path):
    for key, value, message in [
        ("ks", (121,), "config.apps.removal.ks has 121"),
        ("num_queries", 99, "config.apps.removal.num_queries has 99: each must be in 1..16"),
        ("seeds", 0, "config.apps.removal.seeds must be an integer >= 1"),
    ]:
        config = tiny_config()
        config.apps.removal.num_queries = 2  # the default 20 is more than the 16 queries
        config.apps.removal[key] = value
        with pytest.raises(ConfigError, match=message):
            removal.job(config, str(tmp_path / key))
        assert not os.path.exists(tmp_path / key)


def test_binary_one_line_error_and_removal_json_untouched(tmp_path):
    (tmp_path / "removal.json").write_text(json.dumps({"previous": 1}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.removal",
            f"--workdir={tmp_path}",
            "--config.apps.methods=('stride','nosuch')",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: config.apps.methods: unknown attribution method 'nosuch'")
    assert json.loads((tmp_path / "removal.json").read_text()) == {"previous": 1}
    assert sorted(os.listdir(tmp_path)) == ["removal.json"]
