"""Benchmark report: ``lds.png`` (LDS per method with 95% CIs) and ``table.md``.

``results`` is the benchmark's results dict: ``results["methods"][name]`` (and optionally
``results["ablations"][name]``) hold ``lds``, ``lds_ci95``, ``lds_pearson``, ``lds_kendall``,
``seconds``, ``seconds_split`` (``fit`` / ``score`` keys), ``score_stats`` (``nnz_p50``,
``gini``) and optionally ``peak_mb``; an optional ``results["noise_ceiling"]`` holds ``lds``
and ``lds_ci95``. Missing optional keys are shown as "-". Entries of a run with STRIDE carry
``delta_vs_stride`` (``mean``, ``ci95``: method minus STRIDE, paired over queries); the table
has a "vs stride" column only when some row has one.
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_DASH = "-"


def _num(x) -> float:
    """``x`` as a float, NaN when missing or not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _fmt(x, spec: str) -> str:
    v = _num(x)
    return _DASH if math.isnan(v) else format(v, spec)


def _ci(entry) -> tuple[float, float]:
    ci = entry.get("lds_ci95") or (None, None)
    if len(ci) != 2:
        return math.nan, math.nan
    return _num(ci[0]), _num(ci[1])


def _label(name: str, ablation: bool, entry: dict | None = None) -> str:
    """A row's label: the method's name, an ablation as "stride w/o <loss>" (or
    "<base> w/o <loss>" for an ablation of a variant), and a STRIDE row's design size."""
    label = name
    if ablation:
        base = (entry or {}).get("ablation_of", "stride")
        what = name[len(base) + 1 :] if base != "stride" and name.startswith(base + "_") else name
        label = f"{base} w/o {what[3:]}" if what.startswith("no_") else f"{base} {what}"
    design = (entry or {}).get("design")
    if design:
        label += f" (T={design['num_subsets']}, N={design['num_train_rows']})"
    return label


NOISE_CEILING_NOTE = (
    "Noise ceiling: the LDS of a second set of retrains (the same subsets, other seeds) whose "
    "query losses serve as the prediction of the first set's. A method can exceed it: the "
    "ceiling correlates two noisy sets of retrains, so seed noise enters twice, while a "
    "method's prediction carries no seed noise and is compared to one noisy set."
)


def format_delta(d) -> str:
    """``delta_vs_stride`` as ``+0.0123 [+0.004, +0.021]``; empty when absent."""
    if not d:
        return ""
    lo, hi = (d.get("ci95") or (None, None))[:2]
    return f"{_fmt(d.get('mean'), '+.4f')} [{_fmt(lo, '+.3f')}, {_fmt(hi, '+.3f')}]"


def has_delta(results: dict) -> bool:
    """Whether any method or ablation carries a ``delta_vs_stride`` (a run with STRIDE)."""
    return any(e.get("delta_vs_stride") for _, e, _ in entries(results))


def entries(results: dict) -> list[tuple[str, dict, bool]]:
    """(label, entry, is_ablation) for every method, then every ablation."""
    out = [(_label(k, False, v), v, False) for k, v in (results.get("methods") or {}).items()]
    out += [(_label(k, True, v), v, True) for k, v in (results.get("ablations") or {}).items()]
    return out


def format_markdown(results: dict) -> str:
    """The markdown table: one row per method / ablation, then the noise ceiling if present
    and a footer that explains it."""
    rows = entries(results)
    with_peak = any("peak_mb" in e for _, e, _ in rows)
    with_delta = has_delta(results)
    header = ["method", "LDS", "95% CI", "Pearson", "Kendall", "fit s", "score s", "total s"]
    header += ["peak MB"] if with_peak else []
    header += ["nnz p50", "gini"]
    header += ["vs stride (paired CI)"] if with_delta else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for label, e, _ in rows:
        lo, hi = _ci(e)
        split = e.get("seconds_split") or {}
        stats = e.get("score_stats") or {}
        cells = [
            label,
            _fmt(e.get("lds"), ".4f"),
            _DASH if math.isnan(lo) or math.isnan(hi) else f"[{lo:.3f}, {hi:.3f}]",
            _fmt(e.get("lds_pearson"), ".4f"),
            _fmt(e.get("lds_kendall"), ".4f"),
            _fmt(split.get("fit"), ".1f"),
            _fmt(split.get("score"), ".1f"),
            _fmt(e.get("seconds"), ".1f"),
        ]
        cells += [_fmt(e.get("peak_mb"), ".0f")] if with_peak else []
        cells += [_fmt(stats.get("nnz_p50"), ".0f"), _fmt(stats.get("gini"), ".3f")]
        cells += [format_delta(e.get("delta_vs_stride")) or _DASH] if with_delta else []
        lines.append("| " + " | ".join(cells) + " |")
    ceiling = results.get("noise_ceiling")
    if ceiling:
        seeds = ceiling.get("seeds", 1)
        rows = [(f"noise ceiling ({seeds}-seed retrains vs {seeds}-seed)", ceiling)]
        if seeds == 1:
            rows = [("noise ceiling (retrain vs retrain)", ceiling)]
        if "single_seed" in ceiling:
            rows.append(("noise ceiling (1-seed retrains vs 1-seed)", ceiling["single_seed"]))
        for label, entry in rows:
            lo, hi = _ci(entry)
            cells = [
                label,
                _fmt(entry.get("lds"), ".4f"),
                _DASH if math.isnan(lo) or math.isnan(hi) else f"[{lo:.3f}, {hi:.3f}]",
            ]
            cells += [_DASH] * (len(header) - len(cells))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", NOISE_CEILING_NOTE]
    return "\n".join(lines) + "\n"


def _by_lds(row) -> tuple[bool, float]:
    """Sort key: highest LDS first, a missing LDS last (stable among equals)."""
    v = _num(row[1].get("lds"))
    return (math.isnan(v), 0.0 if math.isnan(v) else -v)


def lds_figure(results: dict):
    """The LDS chart as a matplotlib figure (the caller closes it): horizontal bars sorted by
    LDS, best on top (methods blue, ablations orange, a missing LDS last as "n/a"), 95% CI
    error bars, each bar's LDS printed beside it (3 decimals), and the noise ceiling as a
    dashed vertical line labelled with its value, its CI shaded."""
    rows = sorted(entries(results), key=_by_lds)
    labels = [label for label, _, _ in rows]
    values = [_num(e.get("lds")) for _, e, _ in rows]
    err_lo, err_hi = [], []
    for (_, e, _), v in zip(rows, values, strict=True):
        lo, hi = _ci(e)
        ok = not (math.isnan(v) or math.isnan(lo) or math.isnan(hi))
        err_lo.append(max(v - lo, 0.0) if ok else 0.0)
        err_hi.append(max(hi - v, 0.0) if ok else 0.0)
    # each value is printed right of its bar's end or its CI's upper end (at least 0)
    ends = [0.0 if math.isnan(v) else max(v + e, 0.0) for v, e in zip(values, err_hi, strict=True)]
    bars = [0.0 if math.isnan(v) else v for v in values]
    colors = ["tab:orange" if abl else "tab:blue" for _, _, abl in rows]
    fig, ax = plt.subplots(figsize=(7.0, 1.4 + 0.45 * max(len(rows), 1)))
    ypos = list(range(len(rows)))
    if rows:
        ax.barh(ypos, bars, xerr=[err_lo, err_hi], color=colors, capsize=3, height=0.6)
        for y, v, end in zip(ypos, values, ends, strict=True):
            ax.annotate(
                "n/a" if math.isnan(v) else f"{v:.3f}",
                (end, y),
                xytext=(5, 0),
                textcoords="offset points",
                va="center",
                ha="left",
                fontsize=8,
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
                gid="lds_value",
            )
    right = max([*ends, 0.0])
    ceiling = results.get("noise_ceiling")
    if ceiling and not math.isnan(_num(ceiling.get("lds"))):
        c = _num(ceiling["lds"])
        ax.axvline(c, color="black", linestyle="--", linewidth=1.2)
        lo, hi = _ci(ceiling)
        if not (math.isnan(lo) or math.isnan(hi)):
            ax.axvspan(lo, hi, color="gray", alpha=0.15, linewidth=0)
            right = max(right, hi)
        right = max(right, c)
        ax.text(
            c,
            1.0,
            f"noise ceiling {c:.3f}",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            gid="noise_ceiling",
        )
    left, _ = ax.get_xlim()
    ax.set_xlim(min(left, 0.0), right + 0.15 * max(right - min(left, 0.0), 0.1))
    ax.axvline(0.0, color="gray", linewidth=0.8)
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("LDS (Spearman), 95% bootstrap CI")
    name = (results.get("dataset") or {}).get("name")
    ax.set_title(f"Linear datamodeling score{f' on {name}' if name else ''}", pad=16)
    fig.tight_layout()
    return fig


def plot_lds(results: dict, path: str) -> None:
    """Write ``lds_figure(results)`` to ``path`` (PNG)."""
    fig = lds_figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir) -> dict:
    """Write ``lds.png`` and ``table.md`` into ``out_dir`` (created); returns their paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"png": os.path.join(out_dir, "lds.png"), "table": os.path.join(out_dir, "table.md")}
    plot_lds(results, paths["png"])
    with open(paths["table"], "w") as f:
        f.write(format_markdown(results))
    return paths
