"""Wall time of STRIDE and the gradient baselines side by side on one LM job's task.

    python -m experiments.benchmarks.lm_wall_time --config=experiments/configs/lm_shakespeare.py \
        --workdir=DIR --out=FILE.json [--methods=stride,ekfac,kfac,trak] [--rounds=3]

``DIR`` is the LM job's workdir (the base model is loaded from it, or trained). Each method's
fit + score on the config's query rows is timed ``rounds`` times, the methods interleaved (one
call of each per round, so a load change hits them alike); the first round includes XLA
compilation, so the table reports it apart from the median of the others. STRIDE is refitted
every round (no reuse of the process's last fit). The order rotates by one method per round,
so the process's one-time costs (first jitted calls of shared helpers) do not always fall on
the first method. The passes of STRIDE's kernel operators, EK-FAC and K-FAC are kept per task
(``func.programs``): their later rounds compile nothing, and a method whose programs another
has already built (EK-FAC's scoring, shared by both Fishers; K-FAC's factors, EK-FAC's first
pass) compiles less in its first round too. The other methods build their jitted closures
anew, so every one of their rounds compiles. Every run also records the seconds jax spent
compiling during its fit and its score (``profiling.CompileTime``: tracing, lowering, XLA)
and how many programs it built.
Labels are those of ``config.methods`` (variants included); each runs with the block the LM
job gives it (``benchmark.method_block``).
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time

from absl import flags
from ml_collections import config_flags

from stride_jax import methods, profiling
from stride_jax.job import benchmark, cli


def define_flags(default_config: str) -> None:
    config_flags.DEFINE_config_file("config", default_config, "Run config file.")
    flags.DEFINE_string("workdir", None, "The LM job's workdir.", required=True)
    flags.DEFINE_string("out", None, "Where the JSON goes.", required=True)
    flags.DEFINE_list("methods", ["stride", "ekfac", "kfac", "trak"], "Labels to time.")
    flags.DEFINE_integer("rounds", 3, "Timed calls per method (the first includes compilation).")


def timed(task, label: str, config, query) -> dict:
    from stride_jax.stride import method as stride_method

    name, cfg = benchmark.method_block(config, label)
    m = methods.get(name, task.kind)
    with profiling.PeakMemory() as pm:
        t0 = time.perf_counter()
        with profiling.CompileTime() as fit_c:
            if name == "stride":
                fitted = profiling.block_all(stride_method.fit(task, cfg, reuse=False))
            else:
                fitted = profiling.block_all(m.fit(task, cfg))
        t1 = time.perf_counter()
        with profiling.CompileTime() as score_c:
            profiling.block_all(m.score(task, fitted, query, cfg))
        t2 = time.perf_counter()
    return dict(
        fit_s=t1 - t0,
        score_s=t2 - t1,
        total_s=t2 - t0,
        peak_mb=pm.peak_mb,
        fit_compile_s=fit_c.seconds,
        score_compile_s=score_c.seconds,
        compilations=fit_c.programs + score_c.programs,
    )


def run(config, workdir: str, labels, rounds: int) -> dict:
    """Time every label ``rounds`` times, interleaved and rotated; the JSON-ready record."""
    labels = list(labels)
    config.methods = tuple(labels)  # what is validated: only the timed labels
    ctx = benchmark.prepare(config, workdir)
    runs, orders = {label: [] for label in labels}, []
    for r in range(rounds):
        k = r % len(labels)  # rotated: the process's first calls fall on each in turn
        orders.append(labels[k:] + labels[:k])
        for label in orders[-1]:
            runs[label].append(timed(ctx.task, label, config, ctx.splits.query))
            print(f"round {r}: {label} {runs[label][-1]['total_s']:.1f}s", flush=True)
    out = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=platform.processor() or platform.machine(),
        rows=dict(train=len(ctx.task.train), query=len(ctx.splits.query)),
        orders=orders,
        methods={},
    )
    for label, rs in runs.items():
        rest = rs[1:] or rs
        out["methods"][label] = dict(
            first_total_s=rs[0]["total_s"],
            median_fit_s=statistics.median(x["fit_s"] for x in rest),
            median_score_s=statistics.median(x["score_s"] for x in rest),
            median_total_s=statistics.median(x["total_s"] for x in rest),
            median_compile_s=statistics.median(
                x["fit_compile_s"] + x["score_compile_s"] for x in rest
            ),
            peak_mb=max(x["peak_mb"] for x in rs),
            runs=rs,
        )
    return out


def main(argv):
    del argv
    f = flags.FLAGS
    out = run(f.config, f.workdir, f.methods, f.rounds)
    with open(f.out, "w") as fh:
        json.dump(out, fh, indent=1)
    base = out["methods"].get("stride", {}).get("median_total_s")
    for label, m in out["methods"].items():
        ratio = f"  ({m['median_total_s'] / base:.2f}x STRIDE)" if base else ""
        print(
            f"{label}: median {m['median_total_s']:.1f}s{ratio} (of it compilation "
            f"{m['median_compile_s']:.1f}s), first {m['first_total_s']:.1f}s"
        )


if __name__ == "__main__":
    default = cli.config_file("lm_shakespeare.py")
    cli.run_app(main, lambda: define_flags(default), default)
