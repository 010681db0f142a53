"""Scale benchmark: streamed, resumable scoring of planted sparse influence at T << N.

    python -m experiments.benchmarks.scale --n_train=1000000 --n_query=50000 \\
        --num_subsets=4096 --degree=8 --topk=100 --workdir=DIR

Builds the expander design (T subsets x N examples, each example in ``degree`` subsets) and,
per query q, a planted influence vector b_q: ``nnz`` distinct random examples with magnitudes
uniform in [1, 2] and random signs (numpy ``default_rng([seed, 0, q])``). Its responses are
``y_q = A b_q + noise`` (Gaussian, std ``--noise`` per subset, ``default_rng([seed, 1, q])``),
made a batch at a time by a segment sum over the planted examples' subsets, so neither A nor
any Q x N matrix is dense. ``stride.stream.stream_scores`` scores the queries (one batch of
scores in memory, top-k kept, resumable: rerun the same command after a kill) into DIR/scores,
and DIR/scale.json records the sizes, seconds per stage, peak RSS, the machine and how well
the top-k recovers the planted nonzeros (means over queries):

    recall_at_k       planted nonzeros among the top-k of their sign (a positive one among the
                      proponents, a negative one among the opponents), / nnz
    precision_at_k    of the kept entries with a nonzero score (at most 2k per query: the
                      Lasso is sparse), the fraction planted with that sign (0 if none kept)
    precision_at_nnz  of the nnz kept entries with the largest |score|, the fraction planted
                      with that sign (= recall at nnz; exact support recovery gives 1)

The Lasso is ``recover.lasso_scores`` with the pipeline's default path and iterations
(``stride.defaults.lasso_defaults``) unless --maxiter / --path_len say otherwise, at
lam_frac 0.1 (--lam_frac; the pipeline's is 0.01), in working sets of 64 columns
(--working_set; 0 = FISTA on all N columns, --solver=cd = coordinate descent).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import pathlib
import resource
import subprocess
import threading
import time

import jax
import numpy as np
from absl import app, flags

from stride_jax import checkpoint
from stride_jax.errors import ConfigError
from stride_jax.job import cli
from stride_jax.stride import defaults, recover, stream, subsets

# The Lasso's speed is being worked on: which recover.py this process imported (hashed at
# import, not when the run ends: the file may be edited while a long run goes on).
_RECOVER_SHA256 = hashlib.sha256(pathlib.Path(recover.__file__).read_bytes()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ScaleParams:
    """The benchmark's sizes and settings (the flags of the same names)."""

    n_train: int = 1_000_000
    n_query: int = 50_000
    num_subsets: int = 4096
    degree: int = 8
    topk: int = 100
    nnz: int = 10
    noise: float = 0.1
    query_batch: int = 32  # a batch of scores in memory at once (recover chunks it to ~1 GB)
    # Above the noise floor of a planted-sparse truth (BENCHMARKS.md: at the pipeline's 0.01,
    # tuned for LDS on dense real influence, the Lasso keeps thousands of noise entries).
    lam_frac: float = 0.1
    maxiter: int = defaults.lasso_defaults()["maxiter"]
    path_len: int = defaults.lasso_defaults()["path_len"]
    solver: str = "fista"  # recover.LassoConfig.solver ("cd": coordinate descent)
    # recover.LassoConfig.working_set: FISTA on 64 columns at a time, checked on all N (0: the
    # full solver, ~10x slower here: BENCHMARKS.md "Scale").
    working_set: int = 64
    seed: int = 0
    max_batches: int = 0  # > 0: stop after that many new batches (a planned interruption)


def define_flags() -> None:
    """One flag per ``ScaleParams`` field, and --workdir; called by ``__main__``, not at import
    (tests import several binaries)."""
    for f in dataclasses.fields(ScaleParams):
        default = f.default
        define = {int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
            type(default), flags.DEFINE_string
        )
        define(f.name, default, f"ScaleParams.{f.name}")
    flags.DEFINE_string("workdir", None, "Output directory (rerun to resume).", required=True)


def planted(seed: int, start: int, stop: int, n_train: int, nnz: int):
    """The planted nonzeros of queries start..stop-1: (idx_BxP int64, val_BxP float32)."""
    idx, val = [], []
    for q in range(start, stop):
        rng = np.random.default_rng([seed, 0, q])
        idx.append(rng.choice(n_train, nnz, replace=False))
        val.append(rng.choice([-1.0, 1.0], nnz) * rng.uniform(1.0, 2.0, nnz))
    return np.stack(idx), np.stack(val).astype(np.float32)


def responses_fn(design: subsets.Design, p: ScaleParams):
    """``responses(start, stop) -> y_BxT``: A b_q + noise by a segment sum (np.bincount) of
    each planted value over its example's subsets (the sentinel T, if any, lands in a
    dropped extra column)."""
    t = design.num_subsets

    def responses(start: int, stop: int) -> np.ndarray:
        idx_BxP, val_BxP = planted(p.seed, start, stop, p.n_train, p.nnz)
        b = stop - start
        subs_BxPxD = design.subsets_NxD[idx_BxP]
        rows_BxPxD = np.arange(b)[:, None, None] * (t + 1) + subs_BxPxD
        vals_BxPxD = np.broadcast_to(val_BxP[:, :, None], subs_BxPxD.shape)
        y = np.bincount(rows_BxPxD.ravel(), vals_BxPxD.ravel(), minlength=b * (t + 1))
        y_BxT = y.reshape(b, t + 1)[:, :t]
        noise_BxT = [
            np.random.default_rng([p.seed, 1, q]).normal(size=t) for q in range(start, stop)
        ]
        return (y_BxT + p.noise * np.stack(noise_BxT)).astype(np.float32)

    return responses


def recovery(top: dict, p: ScaleParams, chunk: int = 4096) -> dict:
    """The recovery measures of the module docstring from topk.npz's arrays."""
    num_q = top["prop_idx_QxK"].shape[0]
    recall, prec_k, prec_nnz = [], [], []
    for s in range(0, num_q, chunk):
        e = min(s + chunk, num_q)
        idx_BxP, val_BxP = planted(p.seed, s, e, p.n_train, p.nnz)
        pos_BxP = np.where(val_BxP > 0, idx_BxP, -2)  # -2 never matches a kept index (>= -1)
        neg_BxP = np.where(val_BxP < 0, idx_BxP, -2)
        hit_prop = (top["prop_idx_QxK"][s:e, :, None] == pos_BxP[:, None, :]).any(-1)
        hit_opp = (top["opp_idx_QxK"][s:e, :, None] == neg_BxP[:, None, :]).any(-1)
        hits_B = hit_prop.sum(1) + hit_opp.sum(1)
        kept_B = (top["prop_idx_QxK"][s:e] >= 0).sum(1) + (top["opp_idx_QxK"][s:e] >= 0).sum(1)
        recall.append(hits_B / p.nnz)
        prec_k.append(np.where(kept_B > 0, hits_B / np.maximum(kept_B, 1), 0.0))
        mag = np.abs(np.concatenate([top["prop_score_QxK"][s:e], top["opp_score_QxK"][s:e]], 1))
        hit = np.concatenate([hit_prop, hit_opp], 1)
        order = np.argsort(-mag, axis=1, kind="stable")[:, : p.nnz]
        prec_nnz.append(np.take_along_axis(hit, order, 1).mean(1))
    return {
        "recall_at_k": float(np.concatenate(recall).mean()),
        "precision_at_k": float(np.concatenate(prec_k).mean()),
        "precision_at_nnz": float(np.concatenate(prec_nnz).mean()),
        "lasso_nnz_median": float(np.median(top["nnz_Q"])),
        "lasso_nnz_mean": float(np.mean(top["nnz_Q"])),
        "num_queries": int(num_q),
    }


class RssSampler:
    """Peak resident memory (VmRSS of /proc/self/status) sampled every ``every_s`` seconds on
    a background thread, between ``start()`` and ``stop()``; in MB."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak_mb = every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            self._stop.wait(self.every_s)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak_mb, rss_mb())


def rss_mb() -> float:
    """Current VmRSS in MB (0 where /proc is not there)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine() -> dict:
    """CPU model, cores, load, jax version and device, git head: what the seconds depend on."""
    info = pathlib.Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    root = pathlib.Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout

    return dict(
        cpu_model=model,
        os_cpu_count=os.cpu_count(),
        sched_affinity=len(os.sched_getaffinity(0)),
        jax=jax.__version__,
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        git_head=git("rev-parse", "--short", "HEAD").strip(),
        stride_jax_uncommitted=git("status", "--porcelain", "stride_jax").splitlines(),
        recover_py_sha256=_RECOVER_SHA256,
        date=datetime.datetime.now(datetime.UTC).isoformat(),
    )


def _check(p: ScaleParams) -> None:
    if p.n_train < 1 or p.n_query < 1 or p.num_subsets < 1:
        raise ConfigError("n_train, n_query and num_subsets must be >= 1")
    if not 1 <= p.degree <= p.num_subsets:
        raise ConfigError(f"degree must be in [1, num_subsets={p.num_subsets}], got {p.degree}")
    if not 1 <= p.nnz <= p.n_train or not 1 <= p.topk <= p.n_train:
        raise ConfigError(f"nnz and topk must be in [1, n_train={p.n_train}]")
    if p.noise < 0 or p.lam_frac <= 0 or p.query_batch < 1 or p.maxiter < 1 or p.path_len < 1:
        raise ConfigError("need noise >= 0, lam_frac > 0, query_batch, maxiter, path_len >= 1")
    if p.solver not in ("fista", "cd") or p.working_set < 0:
        raise ConfigError(
            f"need solver fista or cd and working_set >= 0, got {p.solver!r}, {p.working_set}"
        )
    if p.working_set and p.solver != "fista":
        raise ConfigError("working_set > 0 runs FISTA: it needs --solver=fista")


def run(p: ScaleParams, workdir: str) -> dict:
    """Build, stream, evaluate; writes and returns ``workdir/scale.json``'s dict (with
    ``complete`` False and no recovery when --max_batches stopped it early)."""
    _check(p)
    t0 = time.perf_counter()
    load_start = list(os.getloadavg())
    sampler = RssSampler().start()
    design = subsets.expander(jax.random.key(p.seed), p.num_subsets, p.n_train, p.degree)
    t_design = time.perf_counter() - t0
    rss_design = rss_mb()
    lasso = defaults.lasso_defaults(
        lam_frac=p.lam_frac,
        maxiter=p.maxiter,
        path_len=p.path_len,
        solver=p.solver,
        working_set=p.working_set,
    )
    tag = {"planted": "uniform[1,2] x random sign", "nnz": p.nnz, "noise": p.noise}
    summary = stream.stream_scores(
        design,
        responses_fn(design, p),
        recover.LassoConfig(**lasso),
        os.path.join(workdir, "scores"),
        p.topk,
        p.query_batch,
        keep_full=False,
        num_queries=p.n_query,
        max_batches=p.max_batches or None,
        tag=tag | {"seed": p.seed},
    )
    rss_peak = sampler.stop()
    t1 = time.perf_counter()
    rec = None
    if summary["complete"]:
        rec = recovery(checkpoint.load_arrays(summary["topk_path"]), p)
    computed = summary["queries_computed"]
    st = summary["seconds"]
    per_query = st["lasso"] / computed if computed else None
    result = {
        "params": dataclasses.asdict(p),
        "n_train": p.n_train,
        "n_query": p.n_query,
        "T": p.num_subsets,
        "degree": p.degree,
        "topk": p.topk,
        "lasso": lasso,
        "queries_done": summary["queries_done"],
        "queries_computed_this_run": computed,
        "complete": summary["complete"],
        "batches_skipped_resumed": summary["batches_skipped"],
        "seconds": {
            "total": time.perf_counter() - t0,
            "design": t_design,
            "evaluate": time.perf_counter() - t1,
            **{f"stream_{k}": v for k, v in st.items()},
        },
        "lasso_seconds_per_query": per_query,
        "projected_seconds_all_queries": per_query * p.n_query if per_query else None,
        "peak_rss_mb": {
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "sampled_during_run": rss_peak,
            "after_design": rss_design,
        },
        "recovery": rec,
        "machine": machine(),
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
    }
    checkpoint.save_json(os.path.join(workdir, "scale.json"), result)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fields = dataclasses.fields(ScaleParams)
    params = ScaleParams(**{f.name: getattr(flags.FLAGS, f.name) for f in fields})
    workdir = flags.FLAGS.workdir
    res = cli.run_job(run, params, workdir)
    rec = res["recovery"] or {}
    print(
        f"{res['queries_done']}/{res['n_query']} queries, {res['seconds']['total']:.1f} s, "
        f"peak RSS {res['peak_rss_mb']['ru_maxrss']:.0f} MB, recall@k "
        f"{rec.get('recall_at_k', float('nan')):.3f}, precision@nnz "
        f"{rec.get('precision_at_nnz', float('nan')):.3f}; {workdir}/scale.json"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
