"""The LM LDS job end to end: the quick configs, a user's HF checkpoint + JSONL, resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments.configs import lm_shakespeare_quick, sft_chitchat_quick
from stride_jax.checkpoint import CheckpointError
from stride_jax.data.tokenizer import CharTokenizer
from stride_jax.errors import ConfigError
from stride_jax.job import benchmark, cli, pretrain
from stride_jax.job.config import pretrain_config
from stride_jax.models import hf_import, transformer
from stride_jax.stride import defaults as stride_defaults


def _check_results(workdir, methods):
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    for name in methods:
        entry = res["methods"][name]
        assert np.isfinite(entry["lds"]) and -1 <= entry["lds"] <= 1
        assert entry["seconds_split"]["fit"] >= 0 and "peak_mb" in entry
    assert os.path.exists(os.path.join(workdir, "lds.png"))
    assert os.path.exists(os.path.join(workdir, "table.md"))
    return res


@pytest.mark.slow  # ~90 s; test_user_hf_checkpoint_and_jsonl runs the same SFT job path
def test_sft_quick_config_end_to_end(tmp_path):
    """Pre-train here, fine-tune on chit-chat responses, retrain, score, LDS."""
    c = sft_chitchat_quick.get_config()
    res = benchmark.run(c, str(tmp_path))
    _check_results(str(tmp_path), c.methods)
    assert res["base_model"]["query_loss"] < res["base_model"]["start_query_loss"]
    assert 0 < res["noise_ceiling"]["lds"] <= 1
    # A restart reuses every cached stage and reproduces the numbers.
    again = benchmark.run(c, str(tmp_path))
    assert again["methods"]["stride"]["lds"] == res["methods"]["stride"]["lds"]


def test_user_hf_checkpoint_and_jsonl(tmp_path):
    """Point the job at a saved HF directory and a prompt/response JSONL file: fine-tune,
    retrain, noise ceiling, STRIDE and baselines, LDS; a restart reproduces the numbers. (The
    slow test_sft_quick_config_end_to_end also pre-trains the model in the job.)"""
    records = [
        {"prompt": f"q{i % 7}: how many {i}?", "response": f"{i % 5} of them, {'ab' * (i % 4)}"}
        for i in range(40)
    ]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records))
    tok = CharTokenizer.from_corpus("".join(r["prompt"] + r["response"] for r in records))
    cfg = transformer.DecoderConfig(
        family="llama", vocab_size=tok.vocab_size, d_model=16, n_layers=2, n_heads=2, max_len=32
    )
    _, params = transformer.build(cfg, jax.random.key(0))
    model_dir = tmp_path / "model"
    hf_import.save_hf(cfg, params, str(model_dir))
    tok.save(str(model_dir / "tokenizer.json"))
    c = lm_shakespeare_quick.get_config()
    c.data.update(name="jsonl", path=str(jsonl), tokenizer=str(model_dir / "tokenizer.json"))
    c.data.update(n_train=30, n_query=6)
    c.model.update(source="hf", path=str(model_dir))
    c.methods = ("stride", "repsim", "bm25", "random")
    c.stride = stride_defaults.decoder()  # the library's default: kernel operators, T = N
    res = benchmark.run(c, str(tmp_path / "run"))
    _check_results(str(tmp_path / "run"), c.methods)
    assert res["dataset"]["n_train_examples"] == 30
    assert res["base_model"]["query_loss"] < res["base_model"]["start_query_loss"]
    assert 0 < res["noise_ceiling"]["lds"] <= 1
    # A restart reuses every cached stage and reproduces the numbers.
    again = benchmark.run(c, str(tmp_path / "run"))
    assert again["methods"]["stride"]["lds"] == res["methods"]["stride"]["lds"]
    assert res["methods"]["stride"]["design"]["num_subsets"] == res["dataset"]["n_train_rows"]


def test_pretrain_resumes_to_the_same_model(tmp_path):
    pc = pretrain_config()
    pc.data.update(block_len=16, n_train=64, n_query=8)
    pc.model.update(d_model=16, n_layers=1, n_heads=2, max_len=16)
    pc.train.update(steps=20, batch=4, warmup_steps=2)
    pc.ckpt_every = 10
    first = pretrain.pretrain(pc, str(tmp_path / "a"))
    ref = hf_import.load_hf(first)[2]
    # Simulate a job killed after step 10: drop the final output and checkpoint, restart.
    shutil.rmtree(first)
    shutil.rmtree(tmp_path / "a" / "pretrain_ckpt" / "20")
    again = hf_import.load_hf(pretrain.pretrain(pc, str(tmp_path / "a")))[2]
    for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(x, y)
    # Another recipe in the same workdir is refused, not silently served the old model.
    pc.train.steps = 30
    with pytest.raises(CheckpointError, match="different config"):
        pretrain.pretrain(pc, str(tmp_path / "a"))
    pc.ckpt_every = 7
    with pytest.raises(ConfigError, match="ckpt_every=7 must be > 0 and divide"):
        pretrain.pretrain(pc, str(tmp_path / "b"))


def test_bad_configs_are_refused(tmp_path):
    c = lm_shakespeare_quick.get_config()
    c.methods = ("nope",)
    with pytest.raises(ConfigError, match="unknown attribution method 'nope'"):
        benchmark.run(c, str(tmp_path))
    c = lm_shakespeare_quick.get_config()
    c.groundtruth.alpha = 1.5
    with pytest.raises(ConfigError, match="alpha"):
        benchmark.run(c, str(tmp_path))
    c = lm_shakespeare_quick.get_config()
    c.model.source = "pickle"
    with pytest.raises(ConfigError, match="model.source"):
        benchmark.run(c, str(tmp_path / "x"))
    c = lm_shakespeare_quick.get_config()
    c.model.source = "hf"
    with pytest.raises(ConfigError, match="model.source='hf' needs model.path"):
        benchmark.run(c, str(tmp_path / "z"))
    c.model.path, c.data.tokenizer = str(tmp_path), "char"  # a char vocabulary cannot match
    with pytest.raises(ConfigError, match="cannot match a model"):
        benchmark.run(c, str(tmp_path / "z"))
    c = lm_shakespeare_quick.get_config()
    c.stride.op_chunk = 0
    with pytest.raises(ConfigError, match="op_chunk must be > 0"):
        benchmark.run(c, str(tmp_path / "z"))
    with pytest.raises(ConfigError, match="not of the form"):
        cli.parse_sweep(["lasso.lam_frac"])
    c = lm_shakespeare_quick.get_config()
    c.methods = ("minilm",)
    c.baselines.minilm.path = str(tmp_path / "no_model")
    with pytest.raises(ConfigError, match="fetch_minilm"):
        benchmark.run(c, str(tmp_path / "y"))


def test_tune_lm_scores_validation_rows_with_the_same_retrains(tmp_path):
    from stride_jax.job import tune

    c = lm_shakespeare_quick.get_config()
    c.data.n_val = 6
    c.groundtruth.noise_ceiling = False
    rows = tune.tune(c, str(tmp_path), "repsim", ["chunk=4,8"])
    assert [r["point"] for r in rows] == [{"chunk": 4}, {"chunk": 8}]
    assert rows[0]["lds"] == pytest.approx(rows[1]["lds"], abs=1e-6)  # chunking changes nothing
    gt = np.load(tmp_path / "groundtruth.npz")
    assert gt["losses_val_MxV"].shape == (8, 6) and gt["losses_MxQ"].shape == (8, 8)
    with pytest.raises(ConfigError, match="unknown config key 'no_such_key'"):
        tune.tune(c, str(tmp_path), "repsim", ["no_such_key=1"])


def test_two_seed_ground_truth_averages_seeds_and_reports_both_ceilings(tmp_path):
    """``groundtruth.seeds=2``: each subset retrained with two training seeds, the losses
    averaged; the one-seed files are the ones a one-seed run caches (reused, not retrained);
    the noise ceiling reports the two-seed and the single-seed agreement, each equal to a
    Spearman correlation computed here from the saved losses."""
    from scipy import stats

    c = lm_shakespeare_quick.get_config()
    c.methods = ("random",)
    one = benchmark.run(c, str(tmp_path))
    assert "single_seed" not in one["noise_ceiling"] and one["noise_ceiling"]["seeds"] == 1
    first = {
        n: np.load(tmp_path / f"{n}.npz")["losses_MxQ"] for n in ("groundtruth", "noise_ceiling")
    }
    c.groundtruth.seeds = 2
    two = benchmark.run(c, str(tmp_path))
    loss = {}
    for stem in ("groundtruth", "noise_ceiling"):
        a = np.load(tmp_path / f"{stem}.npz")["losses_MxQ"]
        b = np.load(tmp_path / f"{stem}_seed1.npz")["losses_MxQ"]
        np.testing.assert_array_equal(a, first[stem])  # the one-seed retrains were reused
        assert np.abs(a - b).max() > 1e-4  # another seed: other minibatches, other losses
        loss[stem] = (a, (a + b) / 2)

    def ceiling(x, y):  # mean over queries of the Spearman correlation across retrains
        return np.mean([stats.spearmanr(x[:, q], y[:, q])[0] for q in range(x.shape[1])])

    nc = two["noise_ceiling"]
    assert nc["seeds"] == 2 and two["ground_truth"]["seeds"] == 2
    assert nc["lds"] == pytest.approx(
        ceiling(loss["groundtruth"][1], loss["noise_ceiling"][1]), abs=1e-5
    )
    single = ceiling(loss["groundtruth"][0], loss["noise_ceiling"][0])
    assert nc["single_seed"]["lds"] == pytest.approx(single, abs=1e-5)
    assert one["noise_ceiling"]["lds"] == pytest.approx(single, abs=1e-5)
    assert "2-seed" in open(tmp_path / "table.md").read()
    c.groundtruth.seeds = 0
    with pytest.raises(ConfigError, match="groundtruth.seeds must be > 0"):
        benchmark.run(c, str(tmp_path))
