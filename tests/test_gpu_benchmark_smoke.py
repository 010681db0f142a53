"""experiments/benchmarks/gpu.py at its smoke size on CPU: the JSON's structure, ratios that
are positive and follow from the recorded timings, the model-FLOPs formula against the
parameter count, and a unit stopped at its budget (its own process, killed) recorded as such.
It asserts no speed target (they are for the GPU)."""

import json
import math

import jax
import pytest

from experiments.benchmarks import gpu, gpu_parts
from stride_jax.models import transformer

# slow: 35-75 s, and the default suite sits near its 10-minute budget (589 s with it included,
# clean clone, 2026-12-03); one worker builds the fixture once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gpu_benchmark")]


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_rounds(timings: dict) -> None:
    for tm in timings.values():
        assert tm["warm"] and tm["times_s"] and all(_positive(t) for t in tm["times_s"])
        assert _positive(tm["first_s"]) and tm["median_s"] in tm["times_s"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Parts a and b in this process; part c's two units in their own processes with budgets
    too small to finish (the kill path); the JSON as ``--out`` writes it."""
    res = gpu.run("smoke", ("a", "b"), isolate=False)
    res["parts"] |= gpu.run("smoke", ("c",), dict(c_mnist=2, c_lm=2))["parts"]
    path = tmp_path_factory.mktemp("gpu") / "gpu.json"
    path.write_text(json.dumps(res))
    return json.loads(path.read_text())


def test_structure_and_machine(smoke):
    assert smoke["size"] == "smoke" and smoke["machine"]["jax"] == jax.__version__
    assert smoke["machine"]["device_kind"] and smoke["machine"]["peak_flops"] is None  # CPU
    assert set(smoke["parts"]) == {"a", "b", "c_mnist", "c_lm"}
    for unit in ("a", "b"):
        entry = smoke["parts"][unit]
        assert entry["status"] == "ok", entry.get("traceback") or entry["error"]
        assert entry["memory"]["device_peak_bytes"] is None  # CPU: not reported
        assert entry["memory"]["host_peak_rss_mb"] > 0
    assert set(smoke["targets"]) >= {"apply", "a_ratio_loop_over_T_ge_20", "b_ratio_ge_100"}
    assert smoke["targets"]["apply"] is False
    assert "| a | T=16:" in gpu.format_table(smoke)


def test_responses_ratios_follow_from_timings(smoke):
    a = smoke["parts"]["a"]["result"]
    assert "random init" in a["model"]["source"]  # no weights here: said in the JSON
    assert [e["T"] for e in a["by_T"].values()] == list(gpu.SIZES["smoke"]["a"]["T"])
    q = gpu.SIZES["smoke"]["a"]["Q"]
    for e in a["by_T"].values():
        tm, t = e["timings"], e["T"]
        _check_rounds(tm)
        per_query = e["seconds_per_query"]
        assert per_query["fused"] == pytest.approx(tm["fused"]["median_s"] / q)
        loop = tm["loop_over_T"]["median_s"] * t / e["loop_operators_timed"] / q
        assert per_query["loop_over_T"] == pytest.approx(loop)
        pairs = tm["loop_over_T_and_Q"]["median_s"] * t / e["pair_calls"]
        assert per_query["loop_over_T_and_Q"] == pytest.approx(pairs)
        for slow in ("loop_over_T", "loop_over_T_and_Q"):
            ratio = e[f"ratio_{slow}_over_fused"]
            assert _positive(ratio) and ratio == pytest.approx(per_query[slow] / per_query["fused"])
        assert e["max_abs_diff_fused_vs_loop"] < 1e-4
        assert e["mfu"] is None and _positive(e["flops_per_s_fused"])
        assert e["max_abs_diff_bf16_vs_fused"] <= 0.05 * e["max_abs_response"] + 1e-3


def test_lasso_ratios_follow_from_timings(smoke):
    b = smoke["parts"]["b"]["result"]
    _check_rounds(b["timings"])
    q, n_sk = gpu.SIZES["smoke"]["b"]["Q"], b["sklearn_queries_timed"]
    seconds = b["seconds_all_queries"]
    assert seconds["sklearn_loop"] == pytest.approx(
        b["timings"]["sklearn_loop"]["median_s"] * q / n_sk
    )
    for name in ("jax_fista_ws", "jax_fista_default", "jax_cd"):
        ratio = b[f"ratio_sklearn_over_{name}"]
        assert _positive(ratio) and ratio == pytest.approx(seconds["sklearn_loop"] / seconds[name])
    best = b["batched_variant"]  # an equal-tolerance variant whose gaps are within tol
    assert best in ("jax_fista_ws", "jax_cd")
    assert b["checks"][best]["rel_gap_max"] <= gpu_parts.GAP_SLACK * 1e-4
    assert b["ratio_sklearn_over_batched"] == pytest.approx(b[f"ratio_sklearn_over_{best}"])


def test_unit_over_budget_is_recorded(smoke):
    for unit in ("c_mnist", "c_lm"):
        entry = smoke["parts"][unit]
        assert entry["status"] == "did_not_finish_in_budget"
        assert "budget" in entry["error"] and entry["budget_s"] == 2.0


def test_flops_formula_counts_the_parameters():
    """At the hook layer 0 with T=0 the formula's weights are the whole model's but the
    embedding (tied: the head counts it once) and the norms."""
    cfg = transformer.DecoderConfig(**gpu_parts.SMOLLM2)
    _, params = transformer.abstract(cfg)
    flops = gpu_parts.flops_per_query(cfg, 0, 1, 0, 16)
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    assert flops["weights_per_pass"] == gpu_parts.param_count(params) - norms
    assert gpu_parts.param_count(params) == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M
