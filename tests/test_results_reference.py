"""The README's results.json reference matches what the job writes (so the doc cannot drift),
and the job's output files are readable by the group and others (mode 0644 under umask 022).

A tiny classifier run (two methods, one ablation, the noise ceiling: every optional block)
writes results.json; its keys (method and ablation names generalised to ``<name>``) must be
exactly the README field table's rows for classifiers (the "runs" column is not "decoder").
The decoder's keys are checked the same way on a tiny decoder run (marked slow: about 25 s of
compilation on 2 cores). Every file and folder at the top of a workdir must match a row of
the README's file table.
"""

import json
import os
import re
import stat

import pytest

from experiments.configs import lm_shakespeare_quick
from stride_jax.job import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## What a run writes"
FIELDS = "### results.json"
FILES = "### Files in the workdir"


def _section(text: str, heading: str, level: str) -> str:
    """The text under ``heading`` up to the next heading of the same ``level`` ("## ")."""
    start = text.index(heading + "\n")
    rest = text[start + len(heading) :]
    end = re.search(rf"^{level}(?!#)", rest, re.M)
    return rest[: end.start()] if end else rest


def _table_rows(block: str) -> dict[str, str]:
    """Every table row's first backticked name -> its second cell (``| `a.b` | all | ...``)."""
    return dict(re.findall(r"^\| `([^`]+)` \| ([^|]*) \|", block, re.M))


def _readme_section() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return _section(f.read(), SECTION, "## ")


def documented_fields(kind: str) -> set[str]:
    """The field table's keys that a ``kind`` run can write (its "runs" cell is not the other
    kind); a key written only under a condition counts (the tiny runs meet them all)."""
    rows = _table_rows(_section(_readme_section(), FIELDS, "### "))
    assert rows, f"README has no field table under {SECTION!r} / {FIELDS!r}"
    other = {"classifier": "decoder", "decoder": "classifier"}[kind]
    return {key for key, runs in rows.items() if not runs.strip().startswith(other)}


def documented_files() -> set[str]:
    return set(_table_rows(_section(_readme_section(), FILES, "### ")))


def _flatten(tree: dict, prefix: str = "") -> set[str]:
    """Every key path of a results dict: ``methods.<name>.score_stats.gini``, ... (a list is a
    leaf); an ablation's fields are the methods' (``ablations.<name>`` plus
    ``methods.<name>.*``)."""
    out = set()
    for key, value in tree.items():
        if prefix in ("methods.", "ablations."):
            key = "<name>"
        path = prefix + key
        if path.startswith("ablations.<name>."):
            path = "methods." + path[len("ablations.") :]
        out.add(path)
        if isinstance(value, dict):
            out |= _flatten(value, path + ".")
    return out


def _pattern(name: str) -> re.Pattern:
    """A file-table entry (``scores_<method>.npy``, ``stride/``) as a regex for a name."""
    parts = re.split(r"<[^>]+>", name.rstrip("/"))
    return re.compile("[^/]+".join(re.escape(p) for p in parts) + r"\Z")


def _run(config, workdir: str) -> dict:
    """The job under umask 022; returns results.json as read back from disk."""
    old = os.umask(0o022)
    try:
        benchmark.run(config, workdir)
    finally:
        os.umask(old)
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A tiny digits run with every optional block: STRIDE and graddot (delta_vs_stride), an
    ablation and the noise ceiling."""
    from conftest import tiny_config

    config = tiny_config()
    # A variant (``variants/``, ``variant_of``) as the ablations' base (``ablation_of``,
    # ``delta_vs_base``).
    config.variants.stride_b = dict(method="stride", lasso=dict(lam_frac=0.02))
    config.methods = (*config.methods, "stride_b")
    config.ablations, config.ablation_base = ("no_linearity",), "stride_b"
    workdir = str(tmp_path_factory.mktemp("cls"))
    return workdir, _run(config, workdir)


def _check_files(workdir: str) -> None:
    patterns = [_pattern(f) for f in documented_files()]
    for name in os.listdir(workdir):
        assert any(p.match(name) for p in patterns), f"{name} is not in the README file table"


def _check_modes(workdir: str, results: dict) -> None:
    """Atomic writes give 0o666 & ~umask (0644), not mkstemp's 0600; orbax's files too."""
    names = ["results.json", "config.json", "groundtruth.npz", "base_model.npz"]
    names += ["groundtruth.npz.config.json", "lds.png", "table.md"]
    names += [f"scores_{m}{ext}" for m in results["methods"] for ext in (".npy", ".meta.json")]
    for name in names:
        mode = stat.S_IMODE(os.stat(os.path.join(workdir, name)).st_mode)
        assert mode == 0o644, f"{name}: {oct(mode)}"
    for root, _, files in os.walk(workdir):
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
            assert mode & 0o044 == 0o044, f"{os.path.join(root, name)}: {oct(mode)}"


def test_classifier_results_keys_are_exactly_the_documented_ones(classifier_run):
    _, results = classifier_run
    written, documented = _flatten(results), documented_fields("classifier")
    assert not written - documented, (
        f"results.json keys missing from README: {written - documented}"
    )
    assert not documented - written, f"README documents keys no run wrote: {documented - written}"


def test_classifier_output_files_are_documented_and_readable(classifier_run):
    workdir, results = classifier_run
    assert os.listdir(os.path.join(workdir, "stride", "stride", "stage1_ckpt"))  # orbax steps
    _check_files(workdir)
    _check_modes(workdir, results)


@pytest.mark.slow
def test_decoder_results_keys_and_files_are_documented(tmp_path):
    config = lm_shakespeare_quick.get_config()
    config.methods = ("random",)
    config.groundtruth.update(num_models=4, models_per_batch=4, seeds=2)
    config.train.steps = 10
    results = _run(config, str(tmp_path))
    written, documented = _flatten(results), documented_fields("decoder")
    assert not written - documented, (
        f"results.json keys missing from README: {written - documented}"
    )
    decoder_only = documented - documented_fields("classifier")
    assert decoder_only <= written, f"README's decoder keys not written: {decoder_only - written}"
    _check_files(str(tmp_path))
    _check_modes(str(tmp_path), results)
