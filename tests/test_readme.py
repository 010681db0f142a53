"""The README's library snippet runs, and .ci/run runs exactly the README's test command."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _python_blocks():
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    assert len(blocks) >= 2, "README lacks its classifier and decoder python blocks"
    return blocks


def test_readme_own_model_snippet_runs(capsys):
    exec(compile(_python_blocks()[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(20, 300)" in out and "most helpful training ids" in out
    lds = float(re.search(r"LDS (-?[0-9.]+)", out).group(1))
    assert lds > 0.3, out  # STRIDE on a trained net: far above the random floor (~0)


def test_readme_decoder_snippet_runs(capsys):
    exec(compile(_python_blocks()[1], "README.md", "exec"), {})
    assert "(4, 32)" in capsys.readouterr().out


def test_readme_own_arrays_and_retrains_snippet_runs(capsys):
    block = next(b for b in _python_blocks() if "lds_from_retrains" in b)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "100 20 3" in out
    assert float(re.search(r"LDS (-?[0-9.]+)", out).group(1)) > 0.5, out


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", _readme(), re.S)
    test_cmd = next(c.strip() for c in commands if "pytest" in c)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert test_cmd in ci_lines
