"""Smoke test of the throughput benchmark: ``run(quick=True)`` on tiny sizes.

Checks that each batched path computes what its loop reference computes, and that every timing
is a positive, finite number. It deliberately asserts NO speed ratio: timings on a shared
machine are noise, and timed assertions do not belong in unit tests.
"""

import json
import math

import pytest

from experiments.benchmarks import throughput

# Agreement tolerances (measured on the quick sizes: 5e-7, 4e-7, 8e-5, 6e-8, 3e-7).
# One worker runs the whole module (pyproject: --dist loadgroup): the fixture is the cost.
# Slow (run with -m slow): it tests a benchmark script, not the library, and the paths
# it times have unit tests of their own (test_lm_stride, test_recover, test_newton,
# test_groundtruth).
pytestmark = [pytest.mark.xdist_group("throughput_smoke"), pytest.mark.slow]

TOLERANCES = {
    ("responses", "max_abs_diff_vs_loop"): 1e-5,  # float32 logits, same maths
    ("lasso", "max_abs_diff_batched_vs_loop"): 1e-5,  # same solver, vmapped vs one query
    ("lasso", "max_rel_diff_vs_sklearn"): 1e-3,  # other solver, float64, tol 1e-4
    ("lasso", "max_rel_diff_lambda_vs_jax"): 1e-5,  # lambda = lam_frac * lambda_max
    ("groundtruth", "max_abs_param_diff"): 1e-4,  # 20 AdamW steps, vmapped vs sequential
    ("lm_responses", "max_abs_diff_vs_loop"): 1e-5,  # decoder layers above the hook
    ("newton", "max_rel_diff"): 1e-4,  # Kronecker blocks vs per-row jacfwd Jacobians
}


@pytest.fixture(scope="module")
def results():
    return throughput.run(quick=True)


def test_quick_run_shape(results):
    assert results["quick"] is True
    assert set(throughput.BENCHES) <= set(results)
    assert json.loads(json.dumps(results)) == results  # what --out writes
    assert results["lasso"]["lasso_config"]["maxiter"] == 200
    assert results["machine"]["backend"] and results["machine"]["os_cpu_count"] >= 1


@pytest.mark.parametrize(("bench", "key"), sorted(TOLERANCES))
def test_batched_agrees_with_reference(results, bench, key):
    value = results[bench][key]
    assert math.isfinite(value) and 0 <= value < TOLERANCES[bench, key], (bench, key, value)


def test_timings_positive_and_finite(results):
    expected = {
        "responses": {"fused", "loop_over_T"},
        "lasso": {"batched", "loop_over_Q", "sklearn_loop_over_Q"},
        "groundtruth": {"vmapped", "sequential"},
        "lm_responses": {"fused", "loop_over_T"},
        "newton": {"structured", "per_row_jacobians"},
    }
    for bench, variants in expected.items():
        timings = results[bench]["timings"]
        assert set(timings) == variants
        for name, t in timings.items():
            assert len(t["times_s"]) == results["reps"], (bench, name)
            for s in (t["median_s"], t["first_s"], *t["times_s"]):
                assert math.isfinite(s) and s > 0, (bench, name, t)
            assert math.isfinite(t["compile_est_s"]) and t["compile_est_s"] >= 0
        ratios = [v for k, v in results[bench].items() if k.startswith("ratio_")]
        assert ratios and all(math.isfinite(r) and r > 0 for r in ratios)  # no value asserted
    assert math.isfinite(results["total_s"]) and results["total_s"] > 0


def test_format_table_lists_every_variant(results):
    table = throughput.format_table(results)
    for bench in throughput.BENCHES:
        for name in results[bench]["timings"]:
            assert f"| {bench} | {name} |" in table
