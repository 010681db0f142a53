"""experiments/benchmarks/cost_scaling.py end to end on the tiny random model (``--model=small``):
every (method, N) cell in its own process with positive fit and score times, peak memory and
parameter counts in the JSON, the Markdown table; and a cell killed at its cap recorded as
``capped`` (the method's larger N then skipped). No speed is asserted."""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments.benchmarks import cost_scaling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# slow: 8 cell processes (about 60-110 s on the shared 2-core machine); one worker runs them.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cost_scaling_smoke")]
pytest.importorskip("chitchat_dataset")

# N > 16: the decoder default's automatic T = N must exceed stage1.sketch_dim (16).
N_TRAIN, N_QUERY = (24, 48), 4


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The binary as a user runs it (its own process, which starts one per cell)."""
    workdir = tmp_path_factory.mktemp("cost_scaling")
    cmd = [sys.executable, "-m", "experiments.benchmarks.cost_scaling", "--model=small"]
    cmd += [f"--n_train={','.join(map(str, N_TRAIN))}", f"--n_query={N_QUERY}", "--max_len=32"]
    cmd += ["--time_cap_s=300", f"--workdir={workdir}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(workdir / "cost_scaling.json") as f:
        return json.load(f), out.stdout


def test_every_cell_has_positive_times(results):
    res, _ = results
    assert res["model"] == "small" and res["n_query"] == N_QUERY
    assert res["machine"]["jax"] and res["machine"]["os_cpu_count"] >= 1
    assert res["data"]["n_train"] == max(N_TRAIN) and res["data"]["max_len"] == 32
    expected = {f"{m}/{n}" for m in cost_scaling.METHODS for n in N_TRAIN}
    assert set(res["cells"]) == expected
    for key, cell in res["cells"].items():
        assert cell["status"] == "ok", (key, cell.get("error"), cell.get("log_tail"))
        for field in ("setup_s", "fit_s", "score_s", "peak_rss_mb", "fit_rows_per_s"):
            assert _positive(float(cell[field])), (key, field, cell[field])
        assert cell["scores_shape"] == [N_QUERY, cell["N"]] and cell["scores_finite"]


def test_parameter_counts(results):
    res, _ = results
    n_layers = res["model_info"]["n_layers"]
    params = {c["method"]: c["params"] for c in res["cells"].values()}
    s = params["stride"]
    assert (
        s["hook_layer"] == round(2 * n_layers / 3)
        and s["upper_blocks"] == n_layers - s["hook_layer"]
    )
    assert 0 < s["params_above_hook"] < res["model_info"]["params"]
    assert (
        s["num_subsets"] > 0
        and s["gate_params_per_operator"] == s["rank"] * res["model_info"]["d_model"]
    )
    # EK-FAC differentiates every MLP kernel: n_layers x 3 x d_model x d_ff
    mi = res["model_info"]
    assert params["ekfac"]["params_differentiated"] == n_layers * 3 * mi["d_model"] * mi["d_ff"]
    assert params["ekfac"]["fisher"] == "sampled"
    for name in ("trak1", "logra"):  # the last block's MLP (their default)
        assert params[name]["params_differentiated"] == 3 * mi["d_model"] * mi["d_ff"]


def test_table(results):
    res, stdout = results
    table = cost_scaling.format_table(res)
    assert table in stdout
    for m in cost_scaling.METHODS:
        for n in N_TRAIN:
            assert f"| {m} | {n} | ok |" in table


def test_cap_kills_the_cell_and_skips_larger_n(tmp_path):
    res = cost_scaling.run("small", [16, 32], 2, 16, ["logra"], cap_s=0.01, workdir=str(tmp_path))
    capped, skipped = res["cells"]["logra/16"], res["cells"]["logra/32"]
    assert capped["status"] == "capped" and capped["phase"] in ("setup_done", "fit_done")
    assert capped["ran_s"] >= 0.01 and _positive(capped["peak_rss_mb"])
    assert skipped["status"] == "skipped" and "N=16" in skipped["reason"]
    assert "| logra | 16 | capped |" in cost_scaling.format_table(res)


def test_kernel_operators_and_ekfac_on_the_same_block(tmp_path):
    """``stride_kernels`` (the decoder default on the last block, top-64 input directions)
    and ``ekfac_last`` (EK-FAC on the same kernels) run and count the same parameters."""
    names = ["stride_kernels", "ekfac_last"]
    res = cost_scaling.run("small", [24], N_QUERY, 32, names, cap_s=300, workdir=str(tmp_path))
    mi = res["model_info"]
    block = 3 * mi["d_model"] * mi["d_ff"]
    for name in names:
        cell = res["cells"][f"{name}/24"]
        assert cell["status"] == "ok", (name, cell.get("error"), cell.get("log_tail"))
        assert cell["scores_shape"] == [N_QUERY, 24] and cell["scores_finite"]
        assert cell["params"]["params_differentiated"] == block
    s = res["cells"]["stride_kernels/24"]
    assert s["num_subsets"] == s["params"]["num_subsets"] == 24  # T = N
    # rank 64 >= every input width of the small model: all of each kernel
    assert s["params"]["gate_params_per_operator"] == block
    assert s["params"]["operator_params"] == 24 * block
    assert res["cells"]["ekfac_last/24"]["params"]["fisher"] == "empirical"
