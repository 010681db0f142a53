"""Multi-host: the LDS binary run as 2 processes on localhost (CPU, gloo collectives, JAX's own
multi-controller runtime) writes the same files and the same scores as one process; bad
multi-host flags are refused in one line."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import tiny_config

from stride_jax import distributed
from stride_jax.errors import ConfigError
from stride_jax.job import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scores of 2 processes against 1: the mesh's data axis then spans both processes, so the
# Lasso and the responses run on other shard shapes; float32 sums may differ in their last
# bits (measured: 3e-8 on STRIDE scores of magnitude 1e-2, 0 on graddot).
REL_TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _config_file(tmp_path) -> str:
    """tests/conftest.py's tiny_config as a config file for the binary."""
    path = tmp_path / "tiny.py"
    path.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {os.path.join(REPO, "tests")!r})
            from conftest import tiny_config

            def get_config():
                return tiny_config()
            """
        )
    )
    return str(path)


def _run_processes(config: str, workdir: str, n: int, devices_each: int = 1) -> list[str]:
    """The LDS binary as ``n`` processes of one job on localhost; returns their logs."""
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={devices_each}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.lds_benchmark",
                f"--config={config}",
                f"--workdir={workdir}",
                f"--coordinator_address=localhost:{port}",
                f"--num_processes={n}",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log[-4000:]}"
    return logs


def _files(workdir) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, f), workdir)
        for d, _, names in os.walk(workdir)
        for f in names
        # orbax's own step metadata stamps times and process counts; compare our outputs
        if "stage1_ckpt" not in d
    }


def _results(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def _check_same_run(one: str, two: str) -> None:
    assert _files(two) == _files(one)
    assert not [f for f in _files(two) if ".tmp-" in f]
    for name in ("stride", "graddot"):
        a = np.load(os.path.join(one, f"scores_{name}.npy"))
        b = np.load(os.path.join(two, f"scores_{name}.npy"))
        np.testing.assert_allclose(b, a, rtol=0, atol=REL_TOL * np.abs(a).max(), err_msg=name)
    gt_one = np.load(os.path.join(one, "groundtruth.npz"))
    gt_two = np.load(os.path.join(two, "groundtruth.npz"))
    np.testing.assert_array_equal(gt_two["masks_MxN"], gt_one["masks_MxN"])
    np.testing.assert_allclose(gt_two["losses_MxQ"], gt_one["losses_MxQ"], rtol=1e-5)
    with (
        open(os.path.join(one, "results.json")) as f1,
        open(os.path.join(two, "results.json")) as f2,
    ):
        r1, r2 = json.load(f1), json.load(f2)
    for name in ("stride", "graddot"):
        assert abs(r2["methods"][name]["lds"] - r1["methods"][name]["lds"]) < 1e-3


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one"))
    benchmark.run(tiny_config(), workdir)
    return workdir


def test_two_processes_write_what_one_writes(one_process, tmp_path):
    workdir = str(tmp_path / "two")
    logs = _run_processes(_config_file(tmp_path), workdir, n=2)
    assert "mesh data=2 x ops=1" in logs[0]
    _check_same_run(one_process, workdir)


@pytest.mark.slow
def test_two_processes_of_two_devices(one_process, tmp_path):
    workdir = str(tmp_path / "two_by_two")
    logs = _run_processes(_config_file(tmp_path), workdir, n=2, devices_each=2)
    assert "mesh data=4 x ops=1" in logs[0]
    _check_same_run(one_process, workdir)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(num_processes=2, process_id=0), "go together"),
        (dict(coordinator_address="localhost:1", num_processes=2), "go together"),
        (dict(coordinator_address="localhost", num_processes=2, process_id=0), "host:port"),
        (dict(coordinator_address="localhost:1", num_processes=0, process_id=0), "at least 1"),
        (dict(coordinator_address="localhost:1", num_processes=2, process_id=2), r"\[0, 2\)"),
    ],
)
def test_bad_flag_combinations_are_refused(flags, message):
    args = {"coordinator_address": None, "num_processes": None, "process_id": None, **flags}
    with pytest.raises(ConfigError, match=message):
        distributed.check_flags(**args)


def test_no_flags_is_one_process():
    assert distributed.check_flags(None, None, None) is False
    assert distributed.is_writer()
    assert distributed.mesh_axes(1, 1) == (1, 1)


def test_binary_refuses_a_bad_combination_in_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.lds_benchmark",
            f"--workdir={tmp_path / 'w'}",
            "--num_processes=2",
            "--process_id=3",
            "--coordinator_address=localhost:1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: --process_id must be in [0, 2) for --num_processes=2, got 3"
    )
    assert not (tmp_path / "w").exists()
