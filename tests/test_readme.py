"""The README's library snippet runs, and .ci/run runs exactly the README's test command."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_python_snippet_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    assert blocks, "README has no python block"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(20, 300)" in out and "most helpful training ids" in out


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", _readme(), re.S)
    test_cmd = next(c.strip() for c in commands if "pytest" in c)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert test_cmd in ci_lines
