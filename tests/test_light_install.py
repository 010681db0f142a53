"""A classifier install (``pip install -e .``, without the `lm` extra) runs the classifier job;
a language-model run without the extra ends in one line naming it.

The `lm` packages are installed in the test environment, so each run happens in a subprocess
whose import system refuses them (as if they were not installed)."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every package of the `lm` extra, what they pull in that nothing else does, and torch.
LM_MODULES = (
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "gguf",
    "regex",
    "tqdm",
    "chitchat_dataset",
    "torch",
)

# Runs a module as ``python -m`` does, with LM_MODULES unimportable; then checks none of them
# was imported. A meta-path finder, not ``sys.modules[name] = None``: some libraries probe
# ``sys.modules`` for torch and would take the None for the module.
_RUNNER = textwrap.dedent(
    """
    import runpy, sys
    BLOCKED = set(sys.argv[1].split(","))
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Blocker())
    module, sys.argv = sys.argv[2], [sys.argv[2]] + sys.argv[3:]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
    """
)


def _run_without_lm(module: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _RUNNER, ",".join(LM_MODULES), module, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_classifier_job_runs_without_the_lm_extra(tmp_path):
    proc = _run_without_lm(
        "experiments.lds_benchmark",
        f"--workdir={tmp_path}",
        "--config=experiments/configs/digits_quick.py",
        "--config.data.n_train=100",
        "--config.data.n_query=10",
        "--config.groundtruth.num_models=4",
        "--config.groundtruth.models_per_batch=4",
        "--config.groundtruth.noise_ceiling=False",
        "--config.stride.design.num_subsets=40",
        "--config.lds.n_boot=20",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert "stride" in json.dumps(results)


def test_lm_run_without_the_lm_extra_names_it(tmp_path):
    """A decoder run with a Hugging Face tokenizer.json: refused in one line naming the extra,
    before any training, and nothing is written."""
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": {}}')
    workdir = tmp_path / "run"
    proc = _run_without_lm(
        "experiments.lds_benchmark",
        f"--workdir={workdir}",
        "--config=experiments/configs/lm_shakespeare_quick.py",
        f"--config.data.tokenizer={tokenizer}",
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and 'pip install -e ".[lm]"' in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not workdir.exists()
