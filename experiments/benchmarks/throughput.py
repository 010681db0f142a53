"""Throughput of the fused / batched / vmapped hot paths vs plain Python loops.

    python -m experiments.benchmarks.throughput --out=FILE.json [--quick]

Stage 2a: ``responses.response_matrix`` vs one jitted single-operator call per operator (and the
same for a decoder's residual-stream operators, ``residual.response_matrix``). Stage 2b:
``recover.lasso_scores`` on Q queries at once vs one query per call, and vs scikit-learn's
``Lasso`` per query. Ground truth: ``groundtruth.retrain_many`` vs M jitted ``mlp.fit`` calls.
Stage 1 (Gauss-Newton): ``newton.curvature_and_gradients``'s Kronecker-structured curvature vs
per-row ``jax.jacfwd`` Jacobians.
Library functions are called exactly as a user calls them (their jits are cached). Variants are
interleaved (one call of each per round), so read the RATIOS. Each gets one warm-up call
(``first_s``; ``compile_est_s = first_s - median_s``), then REPS calls ending in block_until_ready.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from stride_jax import sharding
from stride_jax.data import load_digits
from stride_jax.eval import groundtruth
from stride_jax.job.config import base_config
from stride_jax.models import mlp, transformer
from stride_jax.stride import (
    classifier_inputs,
    newton,
    recover,
    residual,
    responses,
    subsets,
)
from stride_jax.stride.operators import HiddenHook, LogitHook, SteeringOperators

_OUT = flags.DEFINE_string("out", None, "Where to write the results JSON.", required=True)
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes (whole run < 60 s), for smoke tests.")

FULL = {
    "responses": dict(Q=200, T=1000, D=128, C=10, r=32, batch_size=64),
    "lasso": dict(Q=64, N=1400, T=1000, d=5, k_true=20),
    "groundtruth": dict(M=16, n_train=1400, steps=None),  # steps None: base_config's
    "lm_responses": dict(Q=8, T=256, D=64, layers=2, L=64, V=77, r=16, op_chunk=64),
    "newton": dict(N=1000, F=64, H=128, C=10, r_hidden=16, r=64, T=500),
}
QUICK = {
    "responses": dict(Q=16, T=64, D=32, C=10, r=8, batch_size=8),
    "lasso": dict(Q=4, N=200, T=100, d=5, k_true=5),
    "groundtruth": dict(M=4, n_train=200, steps=20),
    "lm_responses": dict(Q=2, T=16, D=16, layers=2, L=16, V=30, r=4, op_chunk=8),
    "newton": dict(N=64, F=12, H=16, C=10, r_hidden=4, r=8, T=32),
}
REPS = 5
BENCHES = ("responses", "lasso", "groundtruth", "lm_responses", "newton")


def _compare(variants: dict, reps: int) -> dict:
    """One warm-up round, then ``reps`` interleaved timed rounds; per-variant timings."""
    times = {name: [] for name in variants}
    for _ in range(reps + 1):  # round 0 is the warm-up (trace + compile)
        for name, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, (first, *rest) in times.items():
        med = statistics.median(rest)
        out[name] = dict(median_s=med, first_s=first, compile_est_s=max(first - med, 0.0))
        out[name]["times_s"] = rest
    return out


def _ratio(timings: dict, slow: str, fast: str) -> float:
    return timings[slow]["median_s"] / timings[fast]["median_s"]


def _report(sizes: dict, tm: dict, slow: str, fast: str, **extra) -> dict:
    out = {"sizes": sizes, "timings": tm, f"ratio_{slow}_over_{fast}": _ratio(tm, slow, fast)}
    return out | extra


def bench_responses(s: dict, mesh) -> dict:
    q, t, d, c, r, bs = (s[k] for k in ("Q", "T", "D", "C", "r", "batch_size"))
    ops = SteeringOperators(d, c, r, t, rngs=nnx.Rngs(0))
    ops.gates[...] = 0.1 * jax.random.normal(jax.random.key(1), (t, c, r))
    graphdef, params = nnx.split(ops, nnx.Param)
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(q, d)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(q, c)), jnp.float32)
    y = jnp.asarray(rng.integers(0, c, q), jnp.int32)

    def fused():  # the library call, as the pipeline makes it
        return responses.response_matrix(graphdef, params, {"h": h, "logits": z}, y, mesh, bs)

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

    tm = _compare({"fused": fused, "loop_over_T": loop}, REPS)
    diff = float(jnp.max(jnp.abs(fused() - loop())))
    return _report(s, tm, "loop_over_T", "fused", max_abs_diff_vs_loop=diff)


def bench_lasso(s: dict, cfg: recover.LassoConfig) -> dict:
    """Lasso section. ``cfg`` is the default: ``job.config.base_config().stride.lasso``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    q, n, t, k = s["Q"], s["N"], s["T"], s["k_true"]
    design = subsets.expander(jax.random.key(2), t, n, s["d"])
    a_TxN = design.dense().astype(np.float64)
    rng = np.random.default_rng(1)
    b_QxN = np.zeros((q, n))
    for i in range(q):
        b_QxN[i, rng.choice(n, k, replace=False)] = rng.normal(0.0, 1.0, k)
    y64 = (b_QxN @ a_TxN.T + 0.1 * rng.normal(size=(q, t))).astype(np.float32).astype(np.float64)
    y_QxT = jnp.asarray(y64, jnp.float32)
    # lambda = lam_frac * lambda_max per query (centred, sklearn scaling), as lasso_scores does.
    corr_QxN = (y64 - y64.mean(1, keepdims=True)) @ (a_TxN - a_TxN.mean(0)) / t
    lam_Q = cfg.lam_frac * np.abs(corr_QxN).max(1)

    def batched():
        return recover.lasso_scores(design, y_QxT, cfg)["scores_QxN"]

    def loop():
        rows = [recover.lasso_scores(design, y_QxT[i : i + 1], cfg) for i in range(q)]
        return jnp.concatenate([r["scores_QxN"] for r in rows])

    def sk():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fits = [Lasso(alpha=lam_Q[i], tol=1e-4).fit(a_TxN, y64[i]) for i in range(q)]
        return np.stack([f.coef_ for f in fits])

    tm = _compare({"batched": batched, "loop_over_Q": loop, "sklearn_loop_over_Q": sk}, REPS)
    jx, ref = np.asarray(batched()), sk()
    lam_jax = np.asarray(recover.lasso_scores(design, y_QxT, cfg)["lam_Q"])
    return {
        **_report(s, tm, "loop_over_Q", "batched"),
        "ratio_sklearn_over_batched": _ratio(tm, "sklearn_loop_over_Q", "batched"),
        "lasso_config": vars(cfg),
        "max_abs_diff_batched_vs_loop": float(np.abs(jx - np.asarray(loop())).max()),
        "max_rel_diff_vs_sklearn": float(np.abs(jx - ref).max() / np.abs(ref).max()),
        "max_rel_diff_lambda_vs_jax": float(np.abs(lam_Q / lam_jax - 1).max()),
    }


def bench_groundtruth(s: dict, mesh) -> dict:
    mc = base_config("classifier").model
    mc.steps = s["steps"] or mc.steps
    splits = load_digits(0, s["n_train"], 100)
    x, y = jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N)
    m, c = s["M"], splits.num_classes
    masks = jnp.asarray(subsets.retention_masks(jax.random.key(5), m, x.shape[0], 0.5))
    keys = jax.random.split(jax.random.key(6), m)

    def vmapped():  # the library call: all M models in one lax.map batch of M (a vmap)
        return groundtruth.retrain_many(mc, keys, x, y, masks, c, mesh, m)

    fit_one = jax.jit(lambda k, xx, yy, w: mlp.fit(mc, k, xx, yy, w, c))
    weights = list(masks.astype(jnp.float32))

    def sequential():
        return [fit_one(keys[i], x, y, weights[i]) for i in range(m)]

    tm = _compare({"vmapped": vmapped, "sequential": sequential}, REPS)
    stacked = jax.tree.map(lambda *ps: jnp.stack(ps), *sequential())
    diffs = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), vmapped(), stacked)
    sizes = dict(s, N=x.shape[0], F=x.shape[1], C=c, steps=mc.steps, hidden=list(mc.hidden))
    diff = float(max(jax.tree.leaves(diffs)))
    return _report(sizes, tm, "sequential", "vmapped", max_abs_param_diff=diff)


def bench_lm_responses(s: dict) -> dict:
    """Language-model stage 2a: ``residual.response_matrix`` (all T operators per query in
    one jitted call; layers above the hook vmapped over operator chunks) vs a jitted
    single-operator function called once per operator."""
    q, t, d, length, r = (s[k] for k in ("Q", "T", "D", "L", "r"))
    cfg = transformer.DecoderConfig(
        family="gpt2",
        vocab_size=s["V"],
        d_model=d,
        n_layers=s["layers"],
        n_heads=4,
        max_len=length,
    )
    gd, params = transformer.build(cfg, jax.random.key(0))
    layer = round(2 * s["layers"] / 3)
    ops = SteeringOperators(d, d, r, t, rngs=nnx.Rngs(0))
    ops.gates[...] = 0.1 * jax.random.normal(jax.random.key(1), (t, d, r))
    ops_gd, ops_p = nnx.split(ops, nnx.Param)
    tokens = jax.random.randint(jax.random.key(2), (q, length), 0, s["V"])
    data = {
        "tokens": tokens,
        "attn": jnp.ones((q, length), jnp.int32),
        "loss_mask": jnp.ones((q, length), jnp.float32).at[:, 0].set(0.0),
    }
    upper = residual.Upper(gd, layer, 4096)
    cache = residual.encode(gd, params, data, layer, 8, 4096, q)
    rc = ml_collections.ConfigDict(dict(op_chunk=s["op_chunk"], query_batch=1))

    def fused():
        return residual.response_matrix(upper, params, ops_gd, ops_p, cache, data, rc)

    @jax.jit
    def one_operator(p, k, h, d):  # operator k on all queries
        o = nnx.merge(ops_gd, p)
        steered = h + o.shifts(o.basis(h), k[None])[0]
        args = (d["attn"], d["tokens"], d["loss_mask"])
        return upper.row_losses(params, h, *args) - upper.row_losses(params, steered, *args)

    ks = [jnp.int32(k) for k in range(t)]

    def loop():
        return jnp.stack([one_operator(ops_p, k, cache["h"], data) for k in ks], axis=1)

    tm = _compare({"fused": fused, "loop_over_T": loop}, REPS)
    diff = float(jnp.max(jnp.abs(fused() - loop())))
    return _report(s, tm, "loop_over_T", "fused", max_abs_diff_vs_loop=diff)


def bench_newton(s: dict) -> dict:
    """Stage 1's Gauss-Newton matrix for hidden + logit operators on an MLP: the library's
    Kronecker-structured blocks (``newton.curvature_and_gradients``) vs per-row Jacobians from
    ``jax.jacfwd`` through the steered logits, ``mean_n J_n^T M_n J_n``."""
    n, f, hd, c, r_h, r, t = (s[k] for k in ("N", "F", "H", "C", "r_hidden", "r", "T"))
    model = mlp.MLP(f, (hd,), c, rngs=nnx.Rngs(0))
    gd, mp = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, f)), jnp.float32)
    y = jnp.asarray(rng.integers(0, c, n), jnp.int32)
    hook = HiddenHook(lambda v: mlp.hidden_site(gd, mp, v), mlp.head_weights(mp), r_h, "pca")
    cache = jax.jit(hook.encode)(x)
    cfg = ml_collections.ConfigDict(
        dict(sketch="gaussian", sketch_dim=2, top_k=c, rank=r, basis_scale=0.1)
    )
    design = subsets.expander(jax.random.key(0), t, n, 5)
    inputs = classifier_inputs.make_inputs(
        cache, y, design, cfg, jax.random.key(1), fixed=hook.fixed
    )
    ops = hook.make_operators(jax.random.key(2), cache, t, cfg)
    structured = jax.jit(lambda: newton.curvature_and_gradients(ops, inputs)[0])
    w_head = hook.fixed["w_head"]
    psi, phi = ops.hidden.basis(cache["u"]), ops.logit.basis(cache["h"])
    p_hidden = hd * r_h

    @jax.jit
    def by_jacobians():
        def logits(flat, n_):  # one row's logits as a function of one operator's gates
            u_gate = flat[:p_hidden].reshape(hd, r_h)
            b_gate = flat[p_hidden:].reshape(c, r)
            a = cache["a"][n_] + u_gate @ psi[n_]
            return cache["logits"][n_] + (
                (jax.nn.gelu(a) - jax.nn.gelu(cache["a"][n_])) @ w_head + b_gate @ phi[n_]
            )

        zero = jnp.zeros(p_hidden + c * r)
        jac_NxCxP = jax.vmap(lambda n_: jax.jacfwd(logits)(zero, n_))(jnp.arange(n))
        prob = jax.nn.softmax(cache["logits"], -1)
        m_NxCxC = jax.vmap(jnp.diag)(prob) - prob[:, :, None] * prob[:, None, :]
        return jnp.einsum("ncp,ncd,ndq->pq", jac_NxCxP, m_NxCxC, jac_NxCxP) / n

    tm = _compare({"structured": structured, "per_row_jacobians": by_jacobians}, REPS)
    a, b = structured(), by_jacobians()
    rel = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    sizes = s | {"P": p_hidden + c * r}
    return _report(sizes, tm, "per_row_jacobians", "structured", max_rel_diff=rel)


def _sh(*cmd: str) -> str:
    root = pathlib.Path(__file__).resolve().parents[2]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    info = pathlib.Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return dict(
        jax=jax.__version__,
        backend=jax.default_backend(),
        num_devices=jax.device_count(),
        device_kind=jax.devices()[0].device_kind,
        os_cpu_count=os.cpu_count(),
        sched_affinity=len(os.sched_getaffinity(0)),
        uname=_sh("uname", "-a") or " ".join(platform.uname()),
        cpu_model=model,
        loadavg_1_5_15=list(os.getloadavg()),  # well above 0 at start: other jobs are running
        git_head=_sh("git", "rev-parse", "--short", "HEAD"),
        stride_jax_uncommitted=_sh("git", "status", "--porcelain", "stride_jax").splitlines(),
        date=datetime.datetime.now(datetime.UTC).isoformat(),
    )


def run(quick: bool = False) -> dict:
    """All the benchmarks; the dict ``--out`` gets. ``quick``: tiny sizes, Lasso maxiter 200
    and lam_frac 0.01 (run to convergence, so that the smoke test's comparison with
    scikit-learn is tight)."""
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    mesh = sharding.make_mesh()
    lc = base_config("classifier").stride.lasso  # the default Lasso config (fixed lambda)
    if quick:  # converged fits at a moderate lambda: the sklearn comparison is then tight (at
        # the default lam_frac 0.003 on these 100 x 200 designs both solvers stop ~5e-3 apart)
        lc.update(maxiter=200, lam_frac=0.01)
    cfg = recover.LassoConfig(**lc.to_dict())
    results = {"quick": quick, "reps": REPS, "machine": machine()}
    results["responses"] = bench_responses(sizes["responses"], mesh)
    results["lasso"] = bench_lasso(sizes["lasso"], cfg)
    results["groundtruth"] = bench_groundtruth(sizes["groundtruth"], mesh)
    results["lm_responses"] = bench_lm_responses(sizes["lm_responses"])
    results["newton"] = bench_newton(sizes["newton"])
    results["total_s"] = time.perf_counter() - t0
    results["loadavg_1_5_15_end"] = list(os.getloadavg())
    return results


def format_table(res: dict) -> str:
    rows = ["| benchmark | variant | median (s) | first call (s) | compile est. (s) |"]
    rows.append("|---|---|---|---|---|")
    for b in BENCHES:
        for name, t in res[b]["timings"].items():
            times = (t["median_s"], t["first_s"], t["compile_est_s"])
            rows.append(f"| {b} | {name} | " + " | ".join(f"{v:.4f}" for v in times) + " |")
    rows += ["", "| ratio | value |", "|---|---|"]
    for b in BENCHES:
        rows += [f"| {b}.{k[6:]} | {v:.2f}x |" for k, v in res[b].items() if k[:6] == "ratio_"]
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
