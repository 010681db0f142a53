"""Report writer: lds.png and table.md, tolerant of missing optional keys."""

import pytest

from stride_jax.eval.report import NOISE_CEILING_NOTE, lds_figure, write_report
from stride_jax.job import cli


def _entry(lds, **extra):
    return {
        "lds": lds,
        "lds_ci95": [lds - 0.05, lds + 0.05],
        "lds_pearson": lds + 0.01,
        "lds_kendall": lds - 0.1,
        "seconds": 12.5,
        "seconds_split": {"fit": 10.0, "score": 2.5},
        "score_stats": {"nnz_p50": 1400.0, "gini": 0.42, "sparsity": 0.0},
        **extra,
    }


def test_report_files_and_rows(tmp_path):
    results = {
        "dataset": {"name": "digits"},
        "methods": {
            "stride": _entry(0.31, peak_mb=512.0),
            "graddot": _entry(0.12),
            "random": {"lds": 0.0, "lds_ci95": [-0.01, 0.01], "seconds": 0.1},  # sparse entry
        },
        "ablations": {"no_fidelity": _entry(0.25), "bernoulli_design": _entry(0.29)},
        "noise_ceiling": {"lds": 0.62, "lds_ci95": [0.58, 0.66]},
    }
    paths = write_report(results, tmp_path / "report")
    png = (tmp_path / "report" / "lds.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    table = (tmp_path / "report" / "table.md").read_text()
    assert paths["table"].endswith("table.md")
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method | LDS | 95% CI") and "peak MB" in lines[0]
    body = [row for row in lines[2:] if row.startswith("|")]  # the noise ceiling note follows
    assert lines[-1] == NOISE_CEILING_NOTE
    labels = [row.split("|")[1].strip() for row in body]
    assert labels == [
        "stride",
        "graddot",
        "random",
        "stride w/o fidelity",
        "stride bernoulli_design",
        "noise ceiling (retrain vs retrain)",
    ]
    assert "| 0.3100 | [0.260, 0.360] |" in body[0] and "| 512 |" in body[0]
    ncols = lines[0].count("|")
    assert all(row.count("|") == ncols for row in body)


def test_report_minimal(tmp_path):
    results = {"methods": {"graddot": {"lds": float("nan")}}}
    write_report(results, tmp_path)
    table = (tmp_path / "table.md").read_text().strip().splitlines()
    assert len(table) == 3 and "peak MB" not in table[0] and "noise" not in table[-1]
    assert (tmp_path / "lds.png").stat().st_size > 0


def _results_with_delta():
    delta = {"mean": -0.19, "ci95": [-0.25, -0.13]}
    return {
        "dataset": {"name": "digits"},
        "methods": {
            "graddot": _entry(0.12, delta_vs_stride=delta),
            "stride": _entry(0.31),
            "trak": _entry(0.4567, delta_vs_stride={"mean": 0.1467, "ci95": [0.1, 0.2]}),
            "random": _entry(float("nan")),
        },
        "ablations": {"no_stability": _entry(0.2, delta_vs_stride=delta)},
        "noise_ceiling": {"lds": 0.62, "lds_ci95": [0.58, 0.66]},
    }


def test_figure_sorts_bars_by_lds_and_prints_each_value():
    import matplotlib.pyplot as plt

    fig = lds_figure(_results_with_delta())
    try:
        assert len(fig.axes) == 1
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == ["trak", "stride", "stride w/o stability", "graddot", "random"]
        values = [t.get_text() for t in ax.texts if t.get_gid() == "lds_value"]
        assert values == ["0.457", "0.310", "0.200", "0.120", "n/a"]
        bars = [p.get_width() for p in ax.patches if p.get_height() == 0.6]
        assert bars == pytest.approx([0.4567, 0.31, 0.2, 0.12, 0.0])
        ceiling = [t.get_text() for t in ax.texts if t.get_gid() == "noise_ceiling"]
        assert ceiling == ["noise ceiling 0.620"]
        # every printed value lies inside the axes' x range
        right = ax.get_xlim()[1]
        assert all(t.xy[0] < right for t in ax.texts if t.get_gid() == "lds_value")
    finally:
        plt.close(fig)


def test_delta_column_and_noise_ceiling_footer(tmp_path):
    results = _results_with_delta()
    write_report(results, tmp_path)
    lines = (tmp_path / "table.md").read_text().strip().splitlines()
    assert lines[0].endswith("| vs stride (paired CI) |")
    rows = {row.split("|")[1].strip(): row for row in lines[2:] if row.startswith("|")}
    assert rows["graddot"].endswith("| -0.1900 [-0.250, -0.130] |")
    assert rows["stride"].endswith("| - |")
    assert lines[-1] == NOISE_CEILING_NOTE and "enters twice" in NOISE_CEILING_NOTE
    printed = cli.format_table(results)
    assert "vs stride" in printed.splitlines()[0] and "+0.1467 [+0.100, +0.200]" in printed

    # without STRIDE (or any delta) neither table has the column; without a noise ceiling
    # there is no footer
    for entry in [*results["methods"].values(), *results["ablations"].values()]:
        entry.pop("delta_vs_stride", None)
    del results["methods"]["random"], results["noise_ceiling"]
    write_report(results, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "vs stride" not in table and "Noise ceiling" not in table
    printed = cli.format_table(results)
    assert "vs stride" not in printed
    assert all(line == line.rstrip() for line in printed.splitlines())


def test_summary_prints_the_noise_ceiling_note(capsys):
    cli.print_summary(_results_with_delta(), "/tmp/run")
    out = capsys.readouterr().out
    assert "noise ceiling (retrains vs retrains): LDS 0.6200" in out
    assert "seed noise enters twice" in " ".join(out.split())
