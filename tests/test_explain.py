"""Query reports and summary plots (``apps.explain``, ``eval.plots``, experiments/explain.py):
the pages list the examples an independent argsort of the scores picks, embed their images
or mark the scored text span (escaped), the LDS job writes them, and the binary refuses bad
input in one line without writing anything."""

import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import tiny_config

from experiments import explain as explain_bin
from stride_jax.apps import explain, run
from stride_jax.data.text import TokenBlocks
from stride_jax.data.tokenizer import CharTokenizer
from stride_jax.eval import plots
from stride_jax.job import benchmark
from stride_jax.models import transformer
from stride_jax.tasks.decoder_task import DecoderTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.xdist_group("explain")  # one worker builds the digits run once


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return os.path.getsize(path) > 100 and f.read(8) == PNG


def _picked(page: str, method: str) -> dict[str, list[str]]:
    """The ids a page lists for ``method``, by role, in page order."""
    section = page.split(f'data-method="{method}"', 1)[1].split("</section>", 1)[0]
    found = re.findall(r'data-role="(\w+)" data-rank="\d+" data-id="([^"]*)"', section)
    return {role: [i for r, i in found if r == role] for role in ("proponent", "opponent")}


def _top(scores_E, k, sign):
    """Indices of the k highest (sign +1) or lowest (sign -1) scores, ties by index."""
    return sorted(range(len(scores_E)), key=lambda e: (-sign * scores_E[e], e))[:k]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished tiny digits LDS job (graddot and random; the job writes its report)."""
    c = tiny_config()
    c.methods = ("graddot", "random")
    c.groundtruth.noise_ceiling = False
    c.apps.report.update(queries=2, top=4)
    workdir = str(tmp_path_factory.mktemp("digits"))
    results = benchmark.run(c, workdir)
    return c, workdir, results


def test_job_writes_the_report(digits_run):
    _, workdir, _ = digits_run
    out = os.path.join(workdir, "report")
    for name in ("lds_vs_time", "score_distribution", "sparsity", "query_0", "query_1"):
        assert _is_png(os.path.join(out, f"{name}.png")), name
    assert not os.path.exists(os.path.join(out, "query_2.html"))  # apps.report.queries = 2
    with open(os.path.join(out, "index.html")) as f:
        index = f.read()
    assert 'href="query_0.html"' in index and 'href="query_1.html"' in index
    assert index.count("data:image/png;base64,") == 4  # lds.png and the three summary plots
    with open(os.path.join(out, "query_1.html")) as f:
        page = f.read()
    assert len(_picked(page, "graddot")["proponent"]) == 4  # apps.report.top = 4


def test_page_lists_the_top_examples_of_each_method(digits_run, tmp_path):
    config, workdir, results = digits_run
    ctx = run.open_run(config, workdir)
    scores = explain.load_scores(workdir, ["graddot", "random"])
    query, top = 5, 6
    path = explain.query_report(
        ctx.task, ctx.splits, scores, query, str(tmp_path), top=top, results=results
    )
    assert path == str(tmp_path / f"query_{query}.html")
    with open(path) as f:
        page = f.read()
    ids = [str(i) for i in ctx.splits.train.ids_N]
    for name, s in scores.items():
        got = _picked(page, name)
        assert got["proponent"] == [ids[e] for e in _top(s[query], top, +1)]
        assert got["opponent"] == [ids[e] for e in _top(s[query], top, -1)]
    assert f"LDS {results['methods']['graddot']['lds']:.3f}" in page
    # the query and every example shown are embedded images; nothing is fetched
    assert page.count("data:image/png;base64,") == 1 + 2 * 2 * top
    assert not re.search(r"(src|href)=\"(https?:|//)", page)
    label = int(ctx.splits.query.y_N[query])
    assert re.search(rf"label {label} · predicted \d+ · loss \d", page)
    assert _is_png(tmp_path / f"query_{query}.png")


def test_explain_query_reads_the_finished_run(digits_run, tmp_path):
    _, workdir, _ = digits_run
    path = explain_bin.explain_query(workdir, 3, ["random"], 2, str(tmp_path / "out"))
    with open(path) as f:
        page = f.read()
    assert 'data-method="random"' in page and 'data-method="graddot"' not in page
    assert len(_picked(page, "random")["opponent"]) == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["query_3.html", "query_3.png"]


def _decoder_task():
    """A tiny untrained decoder over hand-made rows: prompt tokens unscored, response tokens
    scored; example 0 spans two rows; the text holds characters HTML must escape."""
    examples = [
        ("Q<script>", ' A&B "ok"'),
        ("Q: x<y", " yes"),
        ("Q: 1&2", " no"),
        ("Q: z", " <i>"),
    ]
    tok = CharTokenizer.from_corpus("".join(p + r for p, r in examples))
    L = 12
    tokens, loss, attn, eid = [], [], [], []
    for e, (prompt, response) in enumerate(examples):
        ids = tok.encode(prompt + response)
        mask = [0.0] * len(prompt) + [1.0] * len(response)
        for start in range(0, len(ids), L):
            chunk = ids[start : start + L]
            pad = L - len(chunk)
            tokens.append(chunk + [0] * pad)
            loss.append(mask[start : start + L] + [0.0] * pad)
            attn.append([1] * len(chunk) + [0] * pad)
            eid.append(e)
    blocks = TokenBlocks(
        np.array(tokens), np.array(loss), np.array(attn), np.array(eid), ("e0", "e1", "e2", "e3")
    )
    cfg = transformer.DecoderConfig(
        family="llama", vocab_size=tok.vocab_size, d_model=8, n_layers=1, n_heads=1, max_len=L
    )
    gd, params = transformer.build(cfg, jax.random.key(0))
    task = DecoderTask(
        graphdef=gd, params=params, train=blocks, query=blocks, model_config=cfg, tokenizer=tok
    )
    return task, types.SimpleNamespace(train=blocks, query=blocks)


def test_decoder_page_marks_the_scored_span_and_escapes_text(tmp_path):
    task, splits = _decoder_task()
    assert len(splits.train) == 5 and task.num_examples == 4
    scores = {"m<1>": np.array([[0.5, -1.0, 2.0, 0.1]] * len(splits.query), np.float32)}
    path = explain.query_report(task, splits, scores, 0, str(tmp_path), top=2)
    with open(path) as f:
        page = f.read()
    assert "<script>" not in page and "<i>" not in page and "m<1>" not in page
    assert "&lt;script&gt;" in page and "m&lt;1&gt;" in page
    assert _picked(page, "m&lt;1&gt;") == {"proponent": ["e2", "e0"], "opponent": ["e1", "e3"]}
    marks = re.findall(r"<mark>(.*?)</mark>", page)
    assert " no" in marks and " yes" in marks  # the responses of e2 and e1, whole
    assert "Q: 1&amp;2<mark> no</mark>" in page  # the prompt is shown, unmarked
    # example 0's first row holds its prompt and the start of its response
    assert "Q&lt;script&gt;<mark> A&amp;</mark>" in page and "first of 2 rows" in page
    assert "data:image/png" not in page and re.search(r"loss \d", page)
    assert _is_png(tmp_path / "query_0.png")


def test_summary_plots_and_mass_curve(tmp_path):
    np.testing.assert_allclose(
        plots.mass_curve(np.array([[1.0, -4.0, 2.0, 3.0]])), [0.4, 0.7, 0.9, 1]
    )
    assert plots.top_share(plots.mass_curve(np.array([[1.0, -4.0, 2.0, 3.0]])), 0.5) == 0.7
    s = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32)
    scores = {"a": s, "b": np.where(np.abs(s) > 1, s, 0)}
    results = {
        "methods": {
            "a": {"lds": 0.3, "lds_ci95": [0.2, 0.4], "seconds_split": {"fit": 0.0, "score": 0.5}},
            "b": {"lds": 0.7, "lds_ci95": [0.6, 0.8], "seconds": 4.0},
        },
        "noise_ceiling": {"lds": 0.8, "lds_ci95": [0.75, 0.85]},
    }
    paths = plots.write_summary(results, scores, str(tmp_path / "r"))
    assert sorted(paths) == ["lds_vs_time", "score_distribution", "sparsity"]
    assert all(_is_png(p) for p in paths.values())


def _explain(workdir, *args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.explain", f"--workdir={workdir}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


CLI_CASES = {
    "no finished run": ("EMPTY", ["--query=0"], "holds no finished run (results.json is missing)"),
    "query out of range": ("RUN", ["--query=16"], "query 16 is out of range: the run has 16"),
    "method not computed": (
        "RUN",
        ["--query=0", "--method=trak"],
        "method 'trak' was not computed",
    ),
    "top below 1": ("RUN", ["--query=0", "--top=0"], "--top must be at least 1, got 0"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_binary_refuses_bad_input_in_one_line(case, digits_run, tmp_path):
    where, args, expected = CLI_CASES[case]
    workdir = digits_run[1] if where == "RUN" else str(tmp_path / "empty")
    os.makedirs(workdir, exist_ok=True)
    before = sorted(os.listdir(workdir))
    out = tmp_path / "out"
    proc = _explain(workdir, *args, f"--out={out}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and sorted(os.listdir(workdir)) == before
