"""Report writer: lds.png and table.md, tolerant of missing optional keys."""

from stride_jax.eval.report import write_report


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
    body = lines[2:]
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
