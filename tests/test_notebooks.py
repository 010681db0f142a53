"""The Colab notebooks in experiments/colab, executed top to bottom in tiny mode.

Each notebook runs in a fresh IPython kernel (nbclient, kernel "python3") with
``STRIDE_TINY=1``, from a temporary directory (everything it writes lands there) and with the
repository on ``PYTHONPATH``; the kernel inherits the suite's XLA flags and compilation cache.
A cell that raises fails the test. Then the outputs: every printed ``<method>: LDS <x>`` line
is a number in [-1, 1] and the expected methods have one, an image/png is displayed, and each
query report is shown inline (an iframe of the HTML page) and written to disk. The notebooks
are stored without outputs, open with a Colab badge and install the package only on Colab.
"""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB_DIR = os.path.join(REPO, "experiments", "colab")
BADGE_URL = "https://colab.research.google.com/github/stride-jax/stride-jax/blob/main/experiments/colab/{}.ipynb"

# notebook -> (methods with an LDS line, query reports shown)
NOTEBOOKS = {
    "quickstart_digits": (("stride", "graddot"), 1),
    "lm_attribution": (("stride", "graddot", "tfidf"), 1),
    "bring_your_own": (("stride", "graddot", "bm25"), 2),
}
LDS_LINE = re.compile(r"^(\w+): LDS (\S+)", re.MULTILINE)


def _read(name):
    import nbformat

    return nbformat.read(os.path.join(COLAB_DIR, f"{name}.ipynb"), as_version=4)


def test_the_notebooks_are_the_ones_listed_here():
    found = sorted(f[: -len(".ipynb")] for f in os.listdir(COLAB_DIR) if f.endswith(".ipynb"))
    assert found == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stored_clean_with_a_badge_and_a_colab_only_install(name):
    import nbformat

    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert f"]({BADGE_URL.format(name)})" in first.source and "colab-badge.svg" in first.source
    install = code[0].source
    assert 'IN_COLAB = "google.colab" in sys.modules' in install
    assert "%pip install" in install and "if IN_COLAB:" in install
    assert all("%pip" not in c.source and "!pip" not in c.source for c in code[1:])
    assert 'TINY = os.environ.get("STRIDE_TINY", "0") == "1"' in install


def _execute(name, cwd):
    from nbclient import NotebookClient

    nb = _read(name)
    NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.outputs


@pytest.mark.parametrize(
    "name",
    [
        "quickstart_digits",  # about 20 s on 2 busy cores
        "lm_attribution",  # 35-50 s, most of it compiling STRIDE's decoder stage 1
        # 55-70 s (two parts, a pre-training and a decoder job): `pytest -m slow`
        pytest.param("bring_your_own", marks=pytest.mark.slow),
    ],
)
def test_notebook_runs_in_tiny_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("STRIDE_TINY", "1")
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", REPO + (os.pathsep + path if path else ""))
    nb = _execute(name, tmp_path)
    outputs = list(_outputs(nb))

    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "tiny mode" in stdout
    lds = LDS_LINE.findall(stdout)
    methods, reports = NOTEBOOKS[name]
    assert {m for m, _ in lds} >= set(methods), stdout
    for method, value in lds:
        assert -1.0 <= float(value) <= 1.0, (method, value)

    shown = [o.data for o in outputs if o.output_type in ("display_data", "execute_result")]
    assert any("image/png" in d for d in shown)
    pages = [d["text/html"] for d in shown if "<iframe srcdoc=" in d.get("text/html", "")]
    assert len(pages) == reports
    assert all("proponent" in page for page in pages)
    written = {os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs}
    printed = re.findall(r"^report: (\S+\.html)$", stdout, re.MULTILINE)
    assert len(printed) == reports, stdout
    for page in printed:
        assert os.path.join(str(tmp_path), page) in written
        assert os.path.join(str(tmp_path), page[: -len(".html")] + ".png") in written
