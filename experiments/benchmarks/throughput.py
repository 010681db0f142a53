"""Throughput: fused / batched / vmapped hot paths vs plain Python loops, side by side.

    python -m experiments.benchmarks.throughput --out=FILE.json [--quick]

Three comparisons, each measured in one run with the variants interleaved (one repetition of
every variant per round, so machine noise hits all of them alike); report the RATIOS:

1. Stage-2a responses: ``responses.response_matrix`` (Q queries x T operators in one call) vs a
   jitted single-operator function called once per operator in a Python loop.
2. Stage-2b Lasso: ``recover.lasso_scores`` on Q queries at once vs one query per call, and vs
   scikit-learn's ``Lasso`` (a different, coordinate-descent solver) at the same lambdas.
3. Ground truth: ``groundtruth.retrain_many`` (M models, one vmapped call) vs M calls of one
   jitted ``mlp.fit``.

Every variant gets one warm-up call (its time is ``first_s``; ``compile_est_s = first_s -
median_s`` estimates trace + compile), then ``reps`` timed calls ending in
``jax.block_until_ready``; ``median_s`` is their median. ``response_matrix`` and
``retrain_many`` build a fresh ``jax.jit`` on every call, so they recompile each time: they are
timed as-is (``*_api``) and wrapped once in an outer ``jax.jit`` (steady state, the ratios).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from stride_jax import groundtruth, responses, sharding, subsets
from stride_jax.config import base_config
from stride_jax.data import load_digits
from stride_jax.models import mlp
from stride_jax.operators import LogitHook, SteeringOperators
from stride_jax.recover import LassoConfig, lasso_scores

_OUT = flags.DEFINE_string("out", None, "Where to write the results JSON.", required=True)
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes (whole run < 60 s), for smoke tests.")

FULL = dict(reps=5, q_resp=200, t_resp=1000, d_feat=128, classes=10, rank=32, resp_batch=64,
            q_lasso=64, n_lasso=1400, t_lasso=1000, degree=5, k_true=20, models=16,
            n_train=1400, steps=None)
QUICK = dict(reps=5, q_resp=16, t_resp=64, d_feat=32, classes=10, rank=8, resp_batch=8,
             q_lasso=4, n_lasso=200, t_lasso=100, degree=5, k_true=5, models=4,
             n_train=200, steps=20)


def _compare(variants: dict, reps: int) -> dict:
    """Warm up each variant, then time ``reps`` interleaved rounds; per-variant timings."""
    out = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out[name] = {"first_s": time.perf_counter() - t0, "times_s": []}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            out[name]["times_s"].append(time.perf_counter() - t0)
    for r in out.values():
        r["median_s"] = statistics.median(r["times_s"])
        r["compile_est_s"] = max(r["first_s"] - r["median_s"], 0.0)
    return out


def _ratio(timings: dict, slow: str, fast: str) -> float:
    return timings[slow]["median_s"] / timings[fast]["median_s"]


def bench_responses(s: dict, mesh) -> dict:
    q, t, d, c, r = s["q_resp"], s["t_resp"], s["d_feat"], s["classes"], s["rank"]
    ops = SteeringOperators(d, c, r, t, rngs=nnx.Rngs(0))
    ops.gates[...] = 0.1 * jax.random.normal(jax.random.key(1), (t, c, r))
    graphdef, params = nnx.split(ops, nnx.Param)
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(q, d)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(q, c)), jnp.float32)
    y = jnp.asarray(rng.integers(0, c, q), jnp.int32)
    bs = s["resp_batch"]

    def api():
        return responses.response_matrix(graphdef, params, {"h": h, "logits": z}, y, mesh, bs)

    fused = jax.jit(lambda p, h, z, y: responses.response_matrix(
        graphdef, p, {"h": h, "logits": z}, y, mesh, bs))

    @jax.jit
    def one_operator(p, k, h_QxD, z_QxC, y_Q):  # operator k on all queries
        o = nnx.merge(graphdef, p)
        delta_QxC = o.shifts(o.basis(h_QxD), k[None])[0]
        steered = LogitHook.steered_logits({"logits": z_QxC}, delta_QxC)
        ce = optax.softmax_cross_entropy_with_integer_labels
        return ce(z_QxC, y_Q) - ce(steered, y_Q)

    ks = [jnp.int32(k) for k in range(t)]  # device scalars made up front: the loop's best case

    def loop():
        return jnp.stack([one_operator(params, k, h, z, y) for k in ks], axis=1)

    tm = _compare({"fused": lambda: fused(params, h, z, y), "fused_api": api,
                   "loop_over_T": loop}, s["reps"])
    diff = float(jnp.max(jnp.abs(fused(params, h, z, y) - loop())))
    return {"sizes": dict(Q=q, T=t, D=d, C=c, r=r, batch_size=bs), "timings": tm,
            "max_abs_diff_fused_vs_loop": diff,
            "ratio_loop_over_fused": _ratio(tm, "loop_over_T", "fused"),
            "ratio_loop_over_fused_api": _ratio(tm, "loop_over_T", "fused_api")}


def bench_lasso(s: dict, cfg: LassoConfig) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    q, n, t, k = s["q_lasso"], s["n_lasso"], s["t_lasso"], s["k_true"]
    design = subsets.expander(jax.random.key(2), t, n, s["degree"])
    a_TxN = design.dense()
    rng = np.random.default_rng(1)
    b_QxN = np.zeros((q, n), np.float32)
    for i in range(q):
        b_QxN[i, rng.choice(n, k, replace=False)] = rng.normal(0.0, 1.0, k)
    y_QxT = jnp.asarray(b_QxN @ a_TxN.T + 0.1 * rng.normal(size=(q, t)), jnp.float32)
    lam_Q = np.asarray(lasso_scores(design, y_QxT, cfg)["lam_Q"], np.float64)
    a64, y64 = a_TxN.astype(np.float64), np.asarray(y_QxT, np.float64)

    def batched():
        return lasso_scores(design, y_QxT, cfg)["scores_QxN"]

    def loop():
        return jnp.concatenate([lasso_scores(design, y_QxT[i : i + 1], cfg)["scores_QxN"]
                                for i in range(q)])

    def sk():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return np.stack([Lasso(alpha=lam_Q[i], fit_intercept=True, tol=1e-4)
                             .fit(a64, y64[i]).coef_ for i in range(q)])

    tm = _compare({"batched": batched, "loop_over_Q": loop, "sklearn_loop_over_Q": sk},
                  s["reps"])
    jx, ref = np.asarray(batched()), sk()
    return {"sizes": dict(Q=q, N=n, T=t, d=s["degree"], k_true=k), "config": vars(cfg),
            "timings": tm,
            "max_abs_diff_batched_vs_loop": float(np.abs(jx - np.asarray(loop())).max()),
            "max_rel_diff_vs_sklearn": float(np.abs(jx - ref).max() / np.abs(ref).max()),
            "ratio_loop_over_batched": _ratio(tm, "loop_over_Q", "batched"),
            "ratio_sklearn_over_batched": _ratio(tm, "sklearn_loop_over_Q", "batched")}


def bench_groundtruth(s: dict, mesh) -> dict:
    mc = base_config().model
    if s["steps"]:
        mc.steps = s["steps"]
    splits = load_digits(0, s["n_train"], 100)
    x, y = jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N)
    m, c = s["models"], splits.num_classes
    masks = jnp.asarray(subsets.retention_masks(jax.random.key(5), m, x.shape[0], 0.5))
    keys = jax.random.split(jax.random.key(6), m)

    def api():
        return groundtruth.retrain_many(mc, keys, x, y, masks, c, mesh, m)

    vmapped = jax.jit(lambda k, w: groundtruth.retrain_many(mc, k, x, y, w, c, mesh, m))
    fit_one = jax.jit(lambda k, xx, yy, w: mlp.fit(mc, k, xx, yy, w, c))
    weights = [w for w in masks.astype(jnp.float32)]

    def sequential():
        return [fit_one(keys[i], x, y, weights[i]) for i in range(m)]

    tm = _compare({"vmapped": lambda: vmapped(keys, masks), "vmapped_api": api,
                   "sequential": sequential}, s["reps"])
    stacked = jax.tree.map(lambda *ps: jnp.stack(ps), *sequential())
    diffs = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), vmapped(keys, masks), stacked)
    return {"sizes": dict(M=m, N=int(x.shape[0]), F=int(x.shape[1]), C=c,
                          hidden=list(mc.hidden), steps=mc.steps), "timings": tm,
            "max_abs_param_diff_vmapped_vs_sequential": float(max(jax.tree.leaves(diffs))),
            "ratio_sequential_over_vmapped": _ratio(tm, "sequential", "vmapped"),
            "ratio_sequential_over_vmapped_api": _ratio(tm, "sequential", "vmapped_api")}


def machine() -> dict:
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         "")
    dev = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device_kind": dev.device_kind, "num_devices": jax.device_count(),
            "os_cpu_count": os.cpu_count(), "sched_affinity": len(os.sched_getaffinity(0)),
            "uname": subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
            or " ".join(platform.uname()),
            "cpu_model": model, "date": datetime.datetime.now(datetime.UTC).isoformat()}


def run(quick: bool = False) -> dict:
    """Run all three benchmarks; returns the results dict (also what ``--out`` gets)."""
    s = QUICK if quick else FULL
    t0 = time.perf_counter()
    mesh = sharding.make_mesh()
    lc = base_config().stride.lasso
    cfg = LassoConfig(lam_frac=lc.lam_frac, maxiter=100 if quick else lc.maxiter, tol=lc.tol,
                      path_len=lc.path_len, fit_intercept=True)
    results = {"quick": quick, "reps": s["reps"], "machine": machine(),
               "responses": bench_responses(s, mesh), "lasso": bench_lasso(s, cfg),
               "groundtruth": bench_groundtruth(s, mesh)}
    results["total_s"] = time.perf_counter() - t0
    return results


def format_table(res: dict) -> str:
    rows = ["| benchmark | variant | median (s) | first call (s) | compile est. (s) |",
            "|---|---|---|---|---|"]
    for bench in ("responses", "lasso", "groundtruth"):
        for name, t in res[bench]["timings"].items():
            rows.append(f"| {bench} | {name} | {t['median_s']:.4f} | {t['first_s']:.3f} "
                        f"| {t['compile_est_s']:.3f} |")
    rows += ["", "| ratio | value |", "|---|---|"]
    for bench in ("responses", "lasso", "groundtruth"):
        rows += [f"| {bench}.{k[6:]} | {v:.2f}x |" for k, v in res[bench].items()
                 if k.startswith("ratio_")]
    return "\n".join(rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    res = run(_QUICK.value)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res["machine"], indent=2))
    print(format_table(res))
    print(f"total {res['total_s']:.1f}s; results: {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
