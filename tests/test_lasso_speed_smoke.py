"""Smoke test of the Lasso speed benchmark: ``run(quick=True)`` on tiny sizes.

Checks that the benchmark's own float64 duality-gap check agrees with the stopping rule of
solver "cd" and of scikit-learn (every solution within the shared tolerance), that the batched
Lasso reaches scikit-learn's objective, and that every timing is a positive, finite number.
(The default FISTA runs a fixed number of steps: its gap is reported, not bounded.) No speed ratio
is asserted: timings on a shared machine are noise.
"""

import json
import math

import numpy as np
import pytest

from experiments.benchmarks import lasso_speed

# Slow (run with -m slow): it tests a benchmark script, not the library, and the paths
# it times have unit tests of their own (test_recover, against scikit-learn).
pytestmark = [pytest.mark.xdist_group("lasso_speed_smoke"), pytest.mark.slow]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    res = lasso_speed.run(quick=True)
    path = tmp_path_factory.mktemp("lasso_speed") / "out.json"
    path.write_text(json.dumps(res))  # what --out writes must be JSON
    return json.loads(path.read_text())


def test_every_solution_within_the_shared_tolerance(results):
    assert set(results["shapes"]) == set(lasso_speed.QUICK)
    for name, shape in results["shapes"].items():
        tol = shape["sizes"]["tol"]
        assert set(shape["checks"]) == set(shape["timings"]), name
        for variant, check in shape["checks"].items():
            if variant == "jax_fista_default":
                assert math.isfinite(check["rel_gap_max"]), name
                continue
            # the JAX solver sums in float32: ~1e-7 of slack on the float64 gap
            assert 0 <= check["rel_gap_max"] <= 1.02 * tol + 1e-7, (name, variant, check)
            # both objectives are within their gaps of the optimum: at most tol apart
            assert check["objective_minus_sklearn_max"] <= 1.02 * tol + 1e-7, (name, variant)


def test_timings_and_ratios_are_positive_and_finite(results):
    for name, shape in results["shapes"].items():
        assert len([k for k in shape if k.startswith("ratio_")]) == 4, name
        for variant, t in shape["timings"].items():
            assert all(math.isfinite(x) and x > 0 for x in [t["seconds"], *t["times_s"]]), variant
        for key in [k for k in shape if k.startswith("ratio_")]:
            assert math.isfinite(shape[key]) and shape[key] > 0, (name, key)
    assert results["machine"]["sklearn"] and np.isfinite(results["total_s"])


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="unknown shapes"):
        lasso_speed.run(quick=True, shapes=["nope"])
