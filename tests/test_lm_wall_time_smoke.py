"""Smoke test of the LM wall-time benchmark on the quick Shakespeare config: every label is
timed once per round, in a rotated order, and every timing is a positive finite number. It
asserts NO speed ratio (timings on a shared machine are noise)."""

import json
import math

import pytest

from experiments.benchmarks import lm_wall_time
from experiments.configs import lm_shakespeare_quick
from stride_jax.stride import defaults

# Slow (run with -m slow): it tests a benchmark script, not the library, and the paths
# it times have unit tests of their own (test_kernel_operators, test_lm_baselines).
pytestmark = pytest.mark.slow


def test_rounds_rotate_and_time_every_label(tmp_path):
    c = lm_shakespeare_quick.get_config()
    c.stride = defaults.decoder()  # the library's default: kernel operators, T = N
    out = lm_wall_time.run(c, str(tmp_path), ["stride", "kfac"], rounds=2)
    assert out["orders"] == [["stride", "kfac"], ["kfac", "stride"]]
    assert json.loads(json.dumps(out)) == out  # what --out writes
    for label in ("stride", "kfac"):
        m = out["methods"][label]
        assert len(m["runs"]) == 2
        for r in m["runs"]:
            assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("fit_s", "score_s", "total_s"))
            assert r["total_s"] == pytest.approx(r["fit_s"] + r["score_s"])
        assert m["median_total_s"] == m["runs"][1]["total_s"]  # rounds after the first
        first = m["runs"][0]  # a fresh method compiles its passes; the time is inside fit_s
        assert first["compilations"] > 0 and 0 < first["fit_compile_s"] < first["fit_s"]
