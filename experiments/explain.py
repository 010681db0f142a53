"""The report page of any query of a finished LDS run:
python -m experiments.explain --workdir=DIR --query=I [--method=NAME ...] [--top=K] [--out=DIR]

Reopens the run in DIR (its config.json, results.json and cached base model; nothing is
retrained), reads each method's scores from DIR/scores_<method>.npy and writes
OUT/query_<I>.html (self-contained: open it in a browser) and OUT/query_<I>.png, by default
into DIR/report beside the pages the LDS job wrote. ``--method`` (repeatable) picks among
the methods the run computed (default: all of them); ``--top`` is the number of proponents
and opponents shown (default: the run's ``apps.report.top``). Prints the page's path. Bad
input (no finished run, a query or method the run lacks, --top below 1) prints one line and
writes nothing.
"""

import os

from absl import app, flags

from stride_jax import distributed
from stride_jax.apps import explain, run
from stride_jax.errors import ConfigError
from stride_jax.job import cli


def define_flags() -> None:
    """Flags live here, not at import: tests import this module beside other binaries."""
    flags.DEFINE_string("workdir", None, "Workdir of a finished LDS run.", required=True)
    flags.DEFINE_integer("query", None, "Query index (0-based).", required=True)
    flags.DEFINE_multi_string("method", [], "Method to show (repeatable; default: all).")
    flags.DEFINE_integer("top", None, "Proponents and opponents shown (default: the run's).")
    flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/report).")


def explain_query(workdir: str, query: int, names, top, out) -> str:
    """Check every input against the finished run, then open it and write the page."""
    config, results = run.finished_run(workdir)
    available = run.run_methods(results)
    names = list(names) or available
    for name in names:
        run.check_method(name, available)
    top = explain.report_settings(config)[1] if top is None else top
    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    scores = explain.load_scores(workdir, names)
    run.check_query(query, next(iter(scores.values())).shape[0])
    ctx = run.open_run(config, workdir)
    out = out or os.path.join(workdir, "report")
    page = os.path.join(out, f"query_{query}.html")  # the page query_report writes
    with distributed.exclusive("query page") as writer:  # multi-host: process 0 writes it
        if writer:
            page = explain.query_report(ctx.task, ctx.splits, scores, query, out, top, results)
    return page


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    print(cli.run_job(explain_query, f.workdir, f.query, f.method, f.top, f.out))


if __name__ == "__main__":
    cli.run_app(main, define_flags)
