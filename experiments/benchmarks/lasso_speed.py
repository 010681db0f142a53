"""The batched Lasso (``recover.lasso_scores``) vs scikit-learn's coordinate descent per query.

    python -m experiments.benchmarks.lasso_speed --out=FILE.json [--quick] [--shapes=digits,lm]

Equal tolerance: the opt-in ``solver="cd"`` (``stride/lasso_cd.py``) and scikit-learn both stop
a query when its duality gap is at most ``tol * ||y_c||^2 / T`` (scikit-learn's rule, which
``lasso_cd`` adopts), at the same lambda (``lam_frac`` of each query's lambda_max). The default
solver (jaxopt FISTA, a fixed number of steps per path point) is timed in its default config
(``stride.defaults.lasso_defaults``: 6 points x 25 steps) for reference: it has no duality-gap
stop, and the gap it reaches is reported. Every returned solution is checked here, in float64
and independently of the solvers: its duality gap and its objective minus scikit-learn's, both
divided by ||y_c||^2 / T (so in ``tol``'s units; two solvers within tol of the optimum differ
by at most tol), and the relative objective.

Per shape (expander design, Q queries of planted sparse influence: ``k_true`` random examples
with N(0, 1) effects, responses y = A b + 0.1 noise + 1): ``lasso_scores(solver="cd")`` on all
Q queries, with a 6-point path and with the final lambda alone (``path_len`` 1), against
``sklearn.linear_model.Lasso(alpha, tol)`` looped over queries on the design as a scipy CSC
matrix (its fastest input here: a sparse coordinate update costs d, a dense one T) and, where
it fits, as a dense Fortran array. scikit-learn solves at the final lambda directly, its usual
use (warm-starting it along the path was 1.5-2.4x slower in our checks). Its loop is timed on
the first ``sk_queries`` queries and scaled to Q (queries are independent and identically
drawn; ``sk_queries_timed`` says how many were timed). Timings alternate between the variants
(round 0 is a warm-up that compiles), so read the ratios: the machine is shared.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time
import warnings

import jax
import numpy as np
import scipy
import scipy.sparse as sp
import sklearn
from absl import app, flags

from stride_jax.stride import defaults, recover, subsets

_SHAPE = dict(d=5, k_true=20, tol=1e-4, reps=2, sk_queries=0, dense=True, ws=256)
# sk_queries: the sparse loop is timed on that many queries (0: all); dense: time the dense loop
FULL = {
    "digits": _SHAPE | dict(T=3000, N=1400, Q=200, lam_frac=0.003),
    "digits_tol1e-6": _SHAPE | dict(T=3000, N=1400, Q=200, lam_frac=0.003, tol=1e-6),
    "mnist": _SHAPE | dict(T=12000, N=4300, d=10, Q=500, lam_frac=0.003, sk_queries=100),
    "lm": _SHAPE | dict(T=1000, N=2000, Q=100, lam_frac=0.05),
    "large_q64": _SHAPE | dict(T=4096, N=100_000, Q=64, lam_frac=0.01, sk_queries=8, reps=1),
    "large_q256": _SHAPE | dict(T=4096, N=100_000, Q=256, lam_frac=0.01, sk_queries=8, reps=1),
}
for _q in (64, 256, 1000):
    FULL[f"digits_q{_q}"] = FULL["digits"] | dict(Q=_q, sk_queries=min(_q, 200))
for _s in FULL.values():
    _s["dense"] = _s["T"] * _s["N"] <= 2e7  # 160 MB of float64
DENSE_QUERIES = 20  # the dense loop is timed on this many queries (it is 10x+ slower)
GRAM_MAX_N = 5000  # the Gram-matrix variant runs where N x N float64 fits (200 MB)
QUICK = {
    "tiny": _SHAPE | dict(T=100, N=200, Q=8, lam_frac=0.01, reps=1, ws=64),
    "tiny_nonneg": _SHAPE | dict(T=100, N=200, Q=4, lam_frac=0.01, reps=1, nonneg=True, ws=64),
}


def machine() -> dict:
    """What the timings ran on (the machine is shared: the load average says how busy)."""
    info = pathlib.Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    versions = dict(jax=jax.__version__, sklearn=sklearn.__version__, scipy=scipy.__version__)
    return versions | dict(
        numpy=np.__version__,
        backend=jax.default_backend(),
        cpu_model=cpu or platform.processor(),
        os_cpu_count=os.cpu_count(),
        loadavg_1_5_15=list(os.getloadavg()),
    )


def problem(s: dict, seed: int = 0):
    """(design, y_QxT float32, A as scipy CSC float64) for one shape."""
    design = subsets.expander(jax.random.key(seed), s["T"], s["N"], s["d"])
    rows_NxD = design.subsets_NxD
    used = rows_NxD < s["T"]
    cols = np.broadcast_to(np.arange(s["N"])[:, None], rows_NxD.shape)[used]
    a = sp.csc_matrix((np.ones(used.sum()), (rows_NxD[used], cols)), shape=(s["T"], s["N"]))
    rng = np.random.default_rng(seed)
    b_QxN = np.zeros((s["Q"], s["N"]))
    for q in range(s["Q"]):
        b_QxN[q, rng.choice(s["N"], s["k_true"], replace=False)] = rng.normal(0, 1, s["k_true"])
    y_QxT = (a @ b_QxN.T).T + 0.1 * rng.normal(size=(s["Q"], s["T"])) + 1.0
    if s.get("nonneg"):
        y_QxT = (a @ np.abs(b_QxN).T).T + 0.1 * rng.normal(size=(s["Q"], s["T"])) + 1.0
    return design, y_QxT.astype(np.float32), a


def _centred(a, y_QxT):
    mu_N = np.asarray(a.mean(0)).ravel()
    y = y_QxT.astype(np.float64)
    return mu_N, y - y.mean(1, keepdims=True)


def lam_max(a, y_QxT, nonneg=False):
    """Each query's lambda_max in scikit-learn's scaling (centred, float64)."""
    _, yc_QxT = _centred(a, y_QxT)
    g_QxN = (a.T @ yc_QxT.T).T / a.shape[0]  # A_c^T y_c = A^T y_c: y_c sums to 0
    return g_QxN.max(1) if nonneg else np.abs(g_QxN).max(1)


def gap_and_objective(a, y_QxT, b_QxN, lam_Q, nonneg=False):
    """Per query: (duality gap, objective, ||y_c||^2 / T), float64, intercept by centring.
    The gap is scikit-learn's (``gap_enet``): dual point r * min(1, lam T / ||A_c^T r||_inf)."""
    t = a.shape[0]
    mu_N, yc_QxT = _centred(a, y_QxT)
    b_QxN = np.asarray(b_QxN, np.float64)
    r_QxT = yc_QxT - (a @ b_QxN.T).T + (b_QxN @ mu_N)[:, None]
    xtr_QxN = (a.T @ r_QxT.T).T - mu_N * r_QxT.sum(1, keepdims=True)
    dual_Q = xtr_QxN.max(1) if nonneg else np.abs(xtr_QxN).max(1)
    r2_Q, l1_Q = (r_QxT**2).sum(1), np.abs(b_QxN).sum(1)
    const_Q = np.minimum(1.0, lam_Q * t / np.maximum(dual_Q, 1e-300))
    gap_Q = 0.5 * r2_Q * (1 + const_Q**2) + lam_Q * t * l1_Q - const_Q * (r_QxT * yc_QxT).sum(1)
    return gap_Q / t, 0.5 * r2_Q / t + lam_Q * l1_Q, (yc_QxT**2).sum(1) / t


def sklearn_loop(x, y_QxT, lam_Q, s: dict, n: int):
    """``sklearn.linear_model.Lasso`` fitted per query (the first ``n``), coefficients."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    y64 = y_QxT.astype(np.float64)
    out = np.zeros((n, x.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for q in range(n):
            model = Lasso(alpha=lam_Q[q], tol=s["tol"], positive=bool(s.get("nonneg")))
            out[q] = model.set_params(max_iter=100_000).fit(x, y64[q]).coef_
    return out


def sklearn_gram_loop(a, y_QxT, lam_Q, s: dict, n: int):
    """scikit-learn's Gram-matrix coordinate descent (``enet_path`` with ``precompute`` = the
    centred Gram matrix, built once and shared by the queries, and ``Xy`` per query): a
    coordinate update costs N instead of T. On this path ``enet_path`` reads only X's shape
    and dtype, so X is a zero-stride stand-in rather than a dense T x N copy."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import enet_path

    t = a.shape[0]
    mu_N, yc_QxT = _centred(a, y_QxT[:n])
    gram_NxN = np.ascontiguousarray((a.T @ a).toarray() - t * np.outer(mu_N, mu_N))
    x_stand_in = np.broadcast_to(np.zeros((1, 1)), a.shape)
    out = np.zeros((n, a.shape[1]))
    opts = dict(
        l1_ratio=1.0, precompute=gram_NxN, check_input=False, positive=bool(s.get("nonneg"))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for q in range(n):
            y = np.asfortranarray(yc_QxT[q])
            xy = np.ascontiguousarray(a.T @ y)  # = A_c^T y_c: y_c sums to 0
            _, coefs, _ = enet_path(
                x_stand_in, y, alphas=[lam_Q[q]], Xy=xy, tol=s["tol"], max_iter=100_000, **opts
            )
            out[q] = coefs[:, 0]
    return out


def bench_shape(s: dict) -> dict:
    """All variants on one shape, interleaved; timings, ratios, gaps and objectives."""
    design, y_QxT, a = problem(s)
    nonneg = bool(s.get("nonneg"))
    lam_Q = s["lam_frac"] * lam_max(a, y_QxT, nonneg)
    counts = dict(
        sklearn_sparse=s["sk_queries"] or s["Q"], sklearn_dense=min(s["Q"], DENSE_QUERIES)
    )
    cfg = dict(lam_frac=s["lam_frac"], tol=s["tol"], maxiter=100_000, nonneg=nonneg)
    fista = recover.LassoConfig(**defaults.lasso_defaults(lam_frac=s["lam_frac"], nonneg=nonneg))

    def ours(config):
        return lambda: recover.lasso_scores(design, y_QxT, config)["scores_QxN"]

    variants = {
        "jax_cd_path6": ours(recover.LassoConfig(**cfg, path_len=6, solver="cd")),
        "jax_cd_path1": ours(recover.LassoConfig(**cfg, path_len=1, solver="cd")),
        "jax_fista_default": ours(fista),
        # FISTA on working sets (lasso_ws.py) at the same gap tolerance as sklearn
        "jax_fista_ws": ours(
            recover.LassoConfig(**cfg | dict(maxiter=100), path_len=1, working_set=s["ws"])
        ),
        "sklearn_sparse": lambda: sklearn_loop(
            a.tocsc(), y_QxT, lam_Q, s, counts["sklearn_sparse"]
        ),
    }
    if s["N"] <= GRAM_MAX_N:
        counts["sklearn_gram"] = counts["sklearn_sparse"]
        variants["sklearn_gram"] = lambda: sklearn_gram_loop(
            a, y_QxT, lam_Q, s, counts["sklearn_gram"]
        )
    if s["dense"]:
        dense = np.asfortranarray(a.toarray())
        variants["sklearn_dense"] = lambda: sklearn_loop(
            dense, y_QxT, lam_Q, s, counts["sklearn_dense"]
        )
    times = {name: [] for name in variants}
    coefs = {}
    for _ in range(s["reps"] + 1):  # round 0: warm-up (compiles the jitted cores)
        for name, fn in variants.items():
            t0 = time.perf_counter()
            coefs[name] = np.asarray(jax.block_until_ready(fn()))
            times[name].append(time.perf_counter() - t0)
    n_sk = counts["sklearn_sparse"]
    scale = {name: s["Q"] / counts.get(name, s["Q"]) for name in variants}
    out = {"sizes": s, "sk_queries_timed": {k: counts[k] for k in variants if k in counts}}
    out |= {"timings": {}, "checks": {}}
    for name, ts in times.items():
        med = statistics.median(ts[1:]) * scale[name]
        out["timings"][name] = dict(seconds=med, first_s=ts[0] * scale[name], times_s=ts[1:])
    ref_obj = gap_and_objective(a, y_QxT[:n_sk], coefs["sklearn_sparse"], lam_Q[:n_sk], nonneg)[1]
    for name, b_QxN in coefs.items():
        n = len(b_QxN)
        gap_Q, obj_Q, scale_Q = gap_and_objective(a, y_QxT[:n], b_QxN, lam_Q[:n], nonneg)
        m = min(n, n_sk)
        out["checks"][name] = dict(  # in tol's units: / (||y_c||^2 / T)
            rel_gap_max=float((gap_Q / scale_Q).max()),
            rel_gap_median=float(np.median(gap_Q / scale_Q)),
            objective_minus_sklearn_max=float(((obj_Q[:m] - ref_obj[:m]) / scale_Q[:m]).max()),
            objective_over_sklearn_minus_1_max=float((obj_Q[:m] / ref_obj[:m] - 1).max()),
            nnz_median=float(np.median((b_QxN != 0).sum(1))),
        )
    best_sk = min(v["seconds"] for k, v in out["timings"].items() if k.startswith("sklearn"))
    for name in ("jax_cd_path6", "jax_cd_path1", "jax_fista_default", "jax_fista_ws"):
        out[f"ratio_sklearn_best_over_{name}"] = best_sk / out["timings"][name]["seconds"]
    return out


def run(quick: bool = False, shapes=None) -> dict:
    """The benchmark on ``QUICK`` or ``FULL`` shapes (``shapes``: a subset of their names);
    the dict ``--out`` gets."""
    table = QUICK if quick else FULL
    names = list(shapes or table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; choose from {sorted(table)}")
    t0 = time.perf_counter()
    results = {"quick": quick, "machine": machine(), "shapes": {}}
    for name in names:
        results["shapes"][name] = bench_shape(table[name])
        print(format_row(name, results["shapes"][name]), flush=True)
    results["total_s"] = time.perf_counter() - t0
    results["loadavg_1_5_15_end"] = list(os.getloadavg())
    return results


def format_row(name: str, r: dict) -> str:
    tm, ck = r["timings"], r["checks"]
    cells = [f"{k} {v['seconds']:.3f}s (gap {ck[k]['rel_gap_max']:.1e})" for k, v in tm.items()]
    ratios = ", ".join(f"{k[24:]} {v:.2f}x" for k, v in r.items() if k.startswith("ratio_"))
    return f"{name}: " + "; ".join(cells) + f"; best sklearn / {ratios}"


def define_flags() -> None:
    """The binary's flags; called by ``__main__``, not at import (tests import several
    benchmark modules, and absl refuses a flag defined twice)."""
    flags.DEFINE_string("out", None, "Where to write the results JSON.", required=True)
    flags.DEFINE_bool("quick", False, "Tiny sizes (< 1 minute), for smoke tests.")
    flags.DEFINE_list("shapes", None, "Run only these shapes (names in FULL).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = flags.FLAGS.out
    res = run(flags.FLAGS.quick, flags.FLAGS.shapes)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"total {res['total_s']:.1f}s; results: {out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
