"""Summary plots of an LDS run, and the figure of one query report (matplotlib, Agg).

``write_summary(results, scores_by_method, out_dir)`` writes three PNGs beside the sorted LDS
bar chart of ``report.py`` (which it does not repeat):

- ``lds_vs_time.png``: each method's LDS (95% CI) against its wall time (fit + score, log
  seconds), points labelled; the noise ceiling dashed. Accuracy per second in one picture.
- ``score_distribution.png``: the shape of each method's scores: every query's row divided
  by its largest absolute score, pooled, as a histogram (log counts) and a quantile curve.
- ``sparsity.png``: Lorenz-style curves: the share of a query's absolute score mass held by
  its top fraction of training examples (mean over queries); the legend gives the share of
  the top 1% and 10%.

The last two read the first queries' rows, at most ``MAX_SCORES`` scores in all.

``query_figure(query, picks, path)`` draws one query report's figure: image tiles of the
query and each method's proponents and opponents, or (text) a bar chart of their scores by
example id. ``results`` is the LDS job's results dict (see ``report.py``); score matrices
are ``scores_QxE`` (queries x training examples, higher = helps the query).
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from stride_jax.eval import report  # noqa: E402

DPI = 110
MAX_SCORES = 2_000_000  # distribution plots read at most this many scores (whole queries)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _num(x) -> float:
    """``x`` as a float, NaN when missing or not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _ci(entry: dict) -> tuple[float, float]:
    ci = entry.get("lds_ci95") or ()
    return (_num(ci[0]), _num(ci[1])) if len(ci) == 2 else (math.nan, math.nan)


def wall_seconds(entry: dict) -> float:
    """Wall time of one method: fit + score when split, else ``seconds`` (NaN if neither)."""
    split = entry.get("seconds_split") or {}
    if split:
        return sum(_num(v) for v in split.values())
    return _num(entry.get("seconds"))


def lds_vs_time(results: dict, path: str) -> str:
    """LDS with 95% CI against fit + score seconds (log axis), one labelled point per method
    (ablations orange); entries without an LDS or a time are left out."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, entry, ablation in report.entries(results):
        lds, secs = _num(entry.get("lds")), max(wall_seconds(entry), 1e-3)
        if math.isnan(lds) or math.isnan(secs):
            continue
        lo, hi = _ci(entry)
        err = None if math.isnan(lo) else [[max(lds - lo, 0.0)], [max(hi - lds, 0.0)]]
        color = "tab:orange" if ablation else "tab:blue"
        ax.errorbar([secs], [lds], yerr=err, fmt="o", color=color, capsize=3)
        ax.annotate(label, (secs, lds), xytext=(6, 4), textcoords="offset points", fontsize=8)
    ceiling = results.get("noise_ceiling") or {}
    if not math.isnan(_num(ceiling.get("lds"))):
        ax.axhline(ceiling["lds"], color="black", linestyle="--", linewidth=1)
        ax.annotate(
            f"noise ceiling {ceiling['lds']:.3f}",
            (0.01, ceiling["lds"]),
            xycoords=("axes fraction", "data"),
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.1)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("wall time, fit + score (s, log scale)")
    ax.set_ylabel("LDS (Spearman), 95% CI")
    ax.set_title("Accuracy against cost")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def leading_queries(scores_QxE: np.ndarray) -> np.ndarray:
    """The first queries' rows, at most ``MAX_SCORES`` scores (at least one query), so the
    report of a million-example run stays cheap."""
    scores_QxE = np.asarray(scores_QxE)
    return scores_QxE[: max(MAX_SCORES // max(scores_QxE.shape[1], 1), 1)]


def normalised(scores_QxE: np.ndarray) -> np.ndarray:
    """Each query's scores divided by its largest absolute score (all-zero rows stay 0)."""
    s = np.nan_to_num(np.asarray(scores_QxE, np.float64))
    top_Q1 = np.abs(s).max(axis=1, keepdims=True)
    return np.divide(s, top_Q1, out=np.zeros_like(s), where=top_Q1 > 0)


def score_distribution(scores_by_method: dict, path: str) -> str:
    """Histograms (log counts) and quantile curves of the pooled normalised scores."""
    fig, (hist, quant) = plt.subplots(1, 2, figsize=(9.0, 3.8))
    bins = np.linspace(-1.0, 1.0, 81)
    for name, scores in scores_by_method.items():
        s = normalised(leading_queries(scores)).ravel()
        hist.hist(s, bins=bins, histtype="step", log=True, label=name)
        q = np.linspace(0.0, 1.0, 401)
        quant.plot(q, np.quantile(s, q), label=name)
    hist.set_xlabel("score / max |score| of its query")
    hist.set_ylabel("count (log)")
    hist.set_title("Score distribution")
    quant.set_xlabel("quantile")
    quant.set_ylabel("score / max |score| of its query")
    quant.set_title("Quantiles")
    quant.axhline(0.0, color="gray", linewidth=0.8)
    for ax in (hist, quant):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def mass_curve(scores_QxE: np.ndarray) -> np.ndarray:
    """Share of absolute score mass in each query's top k examples, k = 1..E (mean over
    queries with any mass): the Lorenz-style curve, shape E."""
    a = np.sort(np.abs(np.nan_to_num(np.asarray(scores_QxE, np.float64))), axis=1)[:, ::-1]
    total_Q = a.sum(axis=1)
    keep = total_Q > 0
    if not keep.any():
        return np.zeros(a.shape[1])
    return (np.cumsum(a[keep], axis=1) / total_Q[keep, None]).mean(axis=0)


def top_share(curve_E: np.ndarray, fraction: float) -> float:
    """The curve's value at the top ``fraction`` of examples (at least one example)."""
    return float(curve_E[max(int(round(fraction * curve_E.size)), 1) - 1])


def sparsity(scores_by_method: dict, path: str) -> str:
    """Lorenz-style curves (log x) with the top-1% and top-10% shares in the legend."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, scores in scores_by_method.items():
        curve = mass_curve(leading_queries(scores))
        frac = np.arange(1, curve.size + 1) / curve.size
        label = f"{name}: top 1% {top_share(curve, 0.01):.0%}, top 10% {top_share(curve, 0.1):.0%}"
        ax.plot(frac, curve, label=label)
    for f in (0.01, 0.1):
        ax.axvline(f, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("top fraction of training examples by |score| (log scale)")
    ax.set_ylabel("share of |score| mass (mean over queries)")
    ax.set_title("Sparsity of the attributions")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def write_summary(results: dict, scores_by_method: dict, out_dir: str) -> dict[str, str]:
    """The three summary PNGs in ``out_dir`` (created); returns ``{name: path}``."""
    os.makedirs(out_dir, exist_ok=True)
    return {
        name: fn(os.path.join(out_dir, f"{name}.png"))
        for name, fn in (
            ("lds_vs_time", lambda p: lds_vs_time(results, p)),
            ("score_distribution", lambda p: score_distribution(scores_by_method, p)),
            ("sparsity", lambda p: sparsity(scores_by_method, p)),
        )
    }


# --- one query's figure ----------------------------------------------------------------------


def image_of(view: dict) -> np.ndarray:
    """A rendered row's ``image`` as 2-D (a feature vector becomes one row of pixels)."""
    image = np.asarray(view["image"], np.float32)
    return image if image.ndim == 2 else image.reshape(1, -1)


def query_figure(query: dict, picks: dict, path: str, title: str = "") -> str:
    """The figure of one query report. ``query`` is the query's render dict; ``picks`` maps a
    method to ``{"proponents": [(view, score)], "opponents": [(view, score)]}`` (views are
    render dicts). Image rows: the query tile, then per method a row of proponent tiles and
    one of opponent tiles, each titled with its id and score. Text rows: per method a bar
    chart of the proponents' and opponents' scores labelled by example id."""
    fig = _tiles_figure(query, picks, title) if "image" in query else _bars_figure(picks, title)
    return _save(fig, path)


def _scaled(image: np.ndarray) -> np.ndarray:
    lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def _tiles_figure(query: dict, picks: dict, title: str):
    """One mosaic image (one ``imshow``: fast) of the query's row and two rows per method,
    each tile scaled to [0, 1] and captioned below with its id, label and score."""
    tiles = [[(query, f"query {query['id']}\ny={query.get('label', '-')}")]]
    names = []
    for name, sides in picks.items():
        for role in ("proponents", "opponents"):
            names.append(f"{name}\n{role}")
            tiles.append(
                [(v, f"{v['id']} y={v.get('label', '-')}\n{s:+.3g}") for v, s in sides[role]]
            )
    h, w = image_of(query).shape
    gap_h, gap_w = max(h // 2, 1), max(w // 4, 1)
    cell_h, cell_w = h + gap_h, w + gap_w
    cols = max(len(row) for row in tiles)
    mosaic = np.full((len(tiles) * cell_h, cols * cell_w), np.nan, np.float32)
    for r, row in enumerate(tiles):
        for c, (view, _) in enumerate(row):
            mosaic[r * cell_h : r * cell_h + h, c * cell_w : c * cell_w + w] = _scaled(
                image_of(view)
            )
    aspect = 1.0 if h > 1 else max(w / 8, 1.0)  # a feature strip is drawn taller
    fig, ax = plt.subplots(figsize=(1.2 * cols + 1.2, 1.25 * len(tiles) + 0.3))
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, interpolation="nearest", aspect=aspect, vmin=0, vmax=1)
    for r, row in enumerate(tiles):
        for c, (_, caption) in enumerate(row):
            x, y = c * cell_w + w / 2, r * cell_h + h
            ax.text(x, y, caption, ha="center", va="top", fontsize=6)
    ax.set_yticks([r * cell_h + h / 2 for r in range(1, len(tiles))])
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.9 / fig.get_figwidth(), right=0.99, bottom=0.02, top=0.93)
    return fig


def _bars_figure(picks: dict, title: str):
    n = max(1, len(picks))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), squeeze=False)
    for ax, (name, sides) in zip(axes[0], picks.items(), strict=False):
        pairs = list(sides["proponents"]) + list(reversed(sides["opponents"]))
        labels = [str(view["id"])[:24] for view, _ in pairs]
        values = [score for _, score in pairs]
        colors = ["tab:green" if v >= 0 else "tab:red" for v in values]
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0.0, color="gray", linewidth=0.8)
        ax.set_title(f"{name}: proponents (top), opponents (bottom)", fontsize=8)
        ax.set_xlabel("score")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
