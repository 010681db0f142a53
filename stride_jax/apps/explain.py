"""Per-query reports: which training examples each method says help or hurt a query.

``query_report(task, splits, scores_by_method, query, out_dir)`` writes one static,
self-contained HTML page ``query_<i>.html`` (images as base64 PNG data URIs; no network, no
external CSS or JS) and its figure ``query_<i>.png``: the query (image tile, or text with the
scored span marked) with its label, the base model's prediction and loss, then per method its
top proponents (highest scores: the examples that lower the query's loss most) and opponents
(lowest scores), each with its content, id, label, loss and a score bar. ``run_report(ctx,
results)`` is what the LDS job writes next to results.json: the summary plots
(``eval.plots``), the first ``config.apps.report.queries`` query pages and an ``index.html``.

Everything about a row's content comes from ``task.render`` (``{"image", "label", "id"}`` or
``{"text", "tokens", "target", "id"}``); the helpers dispatch on those keys, never on the task
kind. Scores are over training EXAMPLES (``scores_QxE``); an example is shown by its first
row (a decoder's long example spans several rows, ``train.example_id_N``).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from stride_jax.apps import config as apps_config  # noqa: E402
from stride_jax.errors import ConfigError  # noqa: E402
from stride_jax.eval import plots  # noqa: E402

NOTE = (
    "Scores are over training examples: higher means the example lowers this query's loss "
    "(a proponent), lowest means it raises it most (an opponent). Bars are scaled by the "
    "largest absolute score of the method on this query."
)

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:.4em 0}.note{color:#555;font-size:.9em}
.cols{display:flex;gap:2em;flex-wrap:wrap}.cols>div{flex:1;min-width:320px}
.ex{display:flex;gap:.8em;align-items:flex-start;padding:.4em 0;border-top:1px solid #eee}
.ex img,.query img{image-rendering:pixelated;border:1px solid #999;width:72px;height:72px}
.ex img.strip,.query img.strip{height:12px;width:240px}
.query img{width:144px;height:144px}.facts{font-size:.85em;color:#333}
.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em;
 max-height:10em;overflow:auto;background:#fafafa;padding:.3em;border:1px solid #eee}
mark{background:#ffe58a}.bar{display:inline-block;width:120px;height:.7em;background:#eee;
 vertical-align:middle;margin-right:.4em}.bar span{display:block;height:100%}
.pos{background:#2a9d3a}.neg{background:#c23b3b}table{border-collapse:collapse}
td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left}
img.plot{max-width:100%;border:none;width:auto;height:auto}
"""


def report_settings(config) -> tuple[int, int]:
    """``(queries, top)`` from ``config.apps.report`` (defaults for an older run's config)."""
    block = (config.get("apps") or {}).get("report") or apps_config.defaults().report
    return int(block["queries"]), int(block["top"])


def load_scores(workdir: str, names) -> dict[str, np.ndarray]:
    """``{method: scores_QxE}`` from ``workdir/scores_<method>.npy`` (a ``ConfigError`` when
    one is missing)."""
    out = {}
    for name in names:
        path = os.path.join(workdir, f"scores_{name}.npy")
        if not os.path.exists(path):
            raise ConfigError(f"{path} is missing: the run holds no scores of method {name!r}")
        out[name] = np.load(path)
    return out


def check_scores(scores_by_method: dict, num_queries: int, num_examples: int) -> None:
    """A ``ConfigError`` when a score matrix is not queries x training examples."""
    if not scores_by_method:
        raise ConfigError("no method's scores to report")
    for name, s in scores_by_method.items():
        if np.shape(s) != (num_queries, num_examples):
            raise ConfigError(
                f"scores of {name!r} have shape {np.shape(s)}, expected ({num_queries}, "
                f"{num_examples}) (queries x training examples): the run changed since"
            )


def ranked(scores_E: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """``(proponents, opponents)``: indices of the ``top`` highest and lowest scores, best
    first (ties in index order)."""
    s = np.nan_to_num(np.asarray(scores_E, np.float64))
    return np.argsort(-s, kind="stable")[:top], np.argsort(s, kind="stable")[:top]


def example_rows(train) -> tuple[np.ndarray, np.ndarray]:
    """``(first_row_E, rows_E)``: each training example's first row and its number of rows
    (rows are examples unless the row set maps rows to examples, ``example_id_N``)."""
    ids_N = getattr(train, "example_id_N", None)
    if ids_N is None:
        return np.arange(len(train)), np.ones(len(train), np.int64)
    _, first_E, rows_E = np.unique(np.asarray(ids_N), return_index=True, return_counts=True)
    return first_E, rows_E


# --- the model's view of the rows shown ---------------------------------------------------


def model_facts(task, splits, queries, train_rows) -> dict:
    """``{("query", i) or ("train", row): {"loss", "prediction"?}}`` under the base model, in
    one pass over the rows shown (a classifier also gets its predicted class)."""
    queries, train_rows = [int(q) for q in queries], [int(r) for r in train_rows]
    rows = splits.query.subset(queries).concat(splits.train.subset(train_rows))
    losses = np.asarray(task.row_losses(rows), np.float64)
    keys = [("query", q) for q in queries] + [("train", r) for r in train_rows]
    facts = {k: {"loss": float(v)} for k, v in zip(keys, losses, strict=True)}
    x = task.arrays(rows).get("x") if hasattr(task, "logits") else None
    if x is not None:
        for k, p in zip(keys, np.asarray(task.logits(x)).argmax(-1), strict=True):
            facts[k]["prediction"] = int(p)
    return facts


# --- rendering, dispatching on the render dict's keys ------------------------------------


def png_data_uri(image: np.ndarray) -> str:
    """A 2-D array (or a feature vector, as one row of pixels) as a base64 PNG data URI."""
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, plots.image_of({"image": image}), cmap="gray_r", format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def text_spans(view: dict, decode) -> list[tuple[str, bool]]:
    """``[(text, scored)]``: the row's tokens in runs of the same ``target`` flag, each run
    decoded by ``decode(ids)``."""
    pairs = zip(view["tokens"], view["target"], strict=True)
    return [
        (decode([t for t, _ in run]), bool(flag))
        for flag, run in itertools.groupby(pairs, key=lambda p: p[1])
    ]


def decoder_of(task):
    """``ids -> text`` with the task's tokenizer, or the ids themselves when it has none."""
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None:
        return lambda ids: " ".join(str(t) for t in ids) + " "
    return tokenizer.decode


def content_html(view: dict, decode) -> str:
    """The row's content: an embedded image tile, or its text with the scored span marked."""
    if "image" in view:
        strip = ' class="strip"' if np.ndim(view["image"]) == 1 else ""
        alt = html.escape(f"example {view['id']}", quote=True)
        return f'<img{strip} src="{png_data_uri(view["image"])}" alt="{alt}">'
    if "tokens" in view:
        parts = (
            f"<mark>{html.escape(t)}</mark>" if scored else html.escape(t)
            for t, scored in text_spans(view, decode)
        )
        return f'<div class="text">{"".join(parts)}</div>'
    return f'<div class="text">{html.escape(str(view.get("text", "")))}</div>'


def facts_html(view: dict, facts: dict, extra: str = "") -> str:
    """Id, label, prediction and loss of a row, as one escaped line."""
    items = [f"id <b>{html.escape(str(view['id']))}</b>"]
    if "label" in view:
        items.append(f"label {html.escape(str(view['label']))}")
    if "prediction" in facts:
        items.append(f"predicted {html.escape(str(facts['prediction']))}")
    if "loss" in facts:
        items.append(f"loss {facts['loss']:.4g}")
    return f'<div class="facts">{" · ".join(items)}{extra}</div>'


def bar_html(score: float, scale: float) -> str:
    width = 0.0 if scale <= 0 else min(abs(score) / scale, 1.0) * 100
    side = "pos" if score >= 0 else "neg"
    return f'<span class="bar"><span class="{side}" style="width:{width:.1f}%"></span></span>'


def _method_title(name: str, results: dict | None) -> str:
    entry = ((results or {}).get("methods") or {}).get(name) or {}
    if "lds" not in entry:
        return html.escape(name)
    ci = entry.get("lds_ci95") or ()
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 else ""
    return f"{html.escape(name)} — LDS {entry['lds']:.3f}{ci_text}"


def _page(title: str, body: list[str]) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# --- the pages ------------------------------------------------------------------------------


def query_report(
    task,
    splits,
    scores_by_method: dict[str, np.ndarray],
    query: int,
    out_dir: str,
    top: int = 8,
    results: dict | None = None,
) -> str:
    """Write ``out_dir/query_<query>.html`` and ``query_<query>.png``; returns the HTML path.
    ``scores_by_method`` maps a method to its ``scores_QxE`` on ``splits.query``."""
    return query_pages(task, splits, scores_by_method, [query], out_dir, top, results)[0]


def query_pages(task, splits, scores_by_method, queries, out_dir, top=8, results=None):
    """``query_report`` for several queries with one pass of the base model over every row
    shown; returns the HTML paths."""
    if int(top) < 1:
        raise ConfigError(f"top must be at least 1, got {top}")
    check_scores(scores_by_method, len(splits.query), task.num_examples)
    queries = [int(q) for q in queries]
    if not queries:
        return []
    first_E, rows_E = example_rows(splits.train)
    picks = {
        q: {name: ranked(s[q], int(top)) for name, s in scores_by_method.items()} for q in queries
    }
    shown = sorted({int(e) for p in picks.values() for pair in p.values() for e in np.ravel(pair)})
    facts = model_facts(task, splits, queries, first_E[shown])
    os.makedirs(out_dir, exist_ok=True)
    decode, paths = decoder_of(task), []
    cache = {}  # a training example's (view, content html) is rendered once

    def example(e):
        if e not in cache:
            view = task.render(splits.train, int(first_E[e]))
            cache[e] = view, content_html(view, decode)
        return cache[e]

    for q in queries:
        query_view = task.render(splits.query, int(q))
        fig_picks = {}
        body = [
            f"<h1>Query {q} (id {html.escape(str(query_view['id']))})</h1>",
            f'<section class="query">{content_html(query_view, decode)}'
            f"{facts_html(query_view, facts[('query', q)])}</section>",
            f'<p class="note">{html.escape(NOTE)} Figure: query_{q}.png.</p>',
        ]
        for name, (pro, opp) in picks[q].items():
            scores_E = scores_by_method[name][q]
            scale = float(np.nanmax(np.abs(scores_E))) if scores_E.size else 0.0
            body.append(f'<section class="method" data-method="{html.escape(name, quote=True)}">')
            body.append(f"<h2>{_method_title(name, results)}</h2><div class='cols'>")
            fig_picks[name] = {}
            for role, idx in (("proponent", pro), ("opponent", opp)):
                body.append(f"<div><h3>Top {len(idx)} {role}s</h3>")
                fig_picks[name][f"{role}s"] = []
                for rank, e in enumerate(idx, 1):
                    view, content = example(int(e))
                    score = float(scores_E[e])
                    fig_picks[name][f"{role}s"].append((view, score))
                    k = int(rows_E[e])
                    chunks = f" · first of {k} rows" if k > 1 else ""
                    row_facts = facts[("train", int(first_E[e]))]
                    body.append(
                        f'<div class="ex" data-role="{role}" data-rank="{rank}" '
                        f'data-id="{html.escape(str(view["id"]), quote=True)}">{content}<div>'
                        f"<div>#{rank} {bar_html(score, scale)}score {score:+.4g}</div>"
                        f"{facts_html(view, row_facts, chunks)}</div></div>"
                    )
                body.append("</div>")
            body.append("</div></section>")
        title = f"Query {q} (id {query_view['id']})"
        plots.query_figure(query_view, fig_picks, os.path.join(out_dir, f"query_{q}.png"), title)
        path = os.path.join(out_dir, f"query_{q}.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_page(f"{title} — attribution report", body))
        paths.append(path)
    return paths


def index_page(results: dict, pages: list[str], images: dict[str, str], out_dir: str) -> str:
    """``out_dir/index.html``: a table of the methods, links to the query pages and the
    summary plots ``images`` (``{name: png path}``) embedded as data URIs."""
    body = ["<h1>Attribution report</h1>", "<table><tr><th>method</th><th>LDS</th>"]
    body[-1] += "<th>95% CI</th><th>fit + score s</th></tr>"
    for name, e in ((results or {}).get("methods") or {}).items():
        ci = e.get("lds_ci95") or (float("nan"),) * 2
        secs = plots.wall_seconds(e)
        body.append(
            f"<tr><td>{html.escape(name)}</td><td>{e.get('lds', float('nan')):.4f}</td>"
            f"<td>[{ci[0]:.3f}, {ci[1]:.3f}]</td><td>{secs:.2f}</td></tr>"
        )
    body.append("</table><h2>Queries</h2><ul>")
    for page in pages:
        name = os.path.basename(page)
        body.append(f'<li><a href="{html.escape(name, quote=True)}">{html.escape(name)}</a></li>')
    body.append("</ul><h2>Summary plots</h2>")
    for name, path in images.items():
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        body.append(
            f"<h3>{html.escape(name)}</h3>"
            f'<img class="plot" src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
        )
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page("Attribution report", body))
    return path


def run_report(ctx, results: dict) -> str | None:
    """The LDS job's report in ``ctx.workdir/report``: summary plots, the first
    ``config.apps.report.queries`` query pages, ``index.html`` (returned); logs its time.
    A run that scored no method (e.g. the tuner's base run) has nothing to show: None."""
    t0 = time.time()
    names = list(results.get("methods") or {})
    if not names:
        logging.info("report: no method was scored; no report written")
        return None
    num_queries, top = report_settings(ctx.config)
    out_dir = os.path.join(ctx.workdir, "report")
    scores = load_scores(ctx.workdir, names)
    images = plots.write_summary(results, scores, out_dir)
    lds_png = os.path.join(ctx.workdir, "lds.png")
    if os.path.exists(lds_png):
        images = {"lds": lds_png, **images}
    queries = range(min(num_queries, len(ctx.splits.query)))
    pages = query_pages(ctx.task, ctx.splits, scores, queries, out_dir, top, results)
    index = index_page(results, pages, images, out_dir)
    logging.info(
        "report: %d query pages and %d plots in %s (%.1f s)",
        len(pages),
        len(images),
        out_dir,
        time.time() - t0,
    )
    return index
