"""Named method variants (``config.variants``): a variant scores what its method scores with
the same settings, STRIDE presets (the paper's recipe), ablations of a variant, bad specs."""

import numpy as np
import pytest
from conftest import tiny_config

from experiments.configs import digits_quick
from stride_jax.errors import ConfigError
from stride_jax.job import benchmark
from stride_jax.job.config import method_block, validate
from stride_jax.stride import defaults


def test_a_variant_is_its_method_with_the_overrides(tiny, tmp_path):
    c = tiny
    c.variants.ekfac_damped = dict(method="ekfac", damping=1e-2, relative_damping=True)
    c.variants.stride_paper = dict(method="stride", preset="paper", stage1=dict(steps=20))
    c.variants.stride_paper.stage1.update(log_every=10, ckpt_every=10, warmup_steps=2)
    c.methods = ("ekfac", "ekfac_damped", "stride_paper")
    c.ablations = ("no_linearity",)
    c.ablation_base = "stride_paper"
    c.groundtruth.noise_ceiling = False
    res = benchmark.run(c, str(tmp_path))
    # The same method with the variant's settings written into its own block: equal scores.
    d = tiny_config()
    d.baselines.ekfac.update(damping=1e-2, relative_damping=True)
    d.methods = ("ekfac",)
    d.groundtruth.noise_ceiling = False
    ref = benchmark.run(d, str(tmp_path / "ref"))
    np.testing.assert_array_equal(
        np.load(tmp_path / "scores_ekfac_damped.npy"), np.load(tmp_path / "ref/scores_ekfac.npy")
    )
    assert res["methods"]["ekfac_damped"]["lds"] == ref["methods"]["ekfac"]["lds"]
    assert res["methods"]["ekfac_damped"]["variant_of"] == "ekfac"
    assert res["methods"]["ekfac"]["lds"] != ref["methods"]["ekfac"]["lds"]  # damping matters
    # The paper preset runs the Adam stage 1 (not the Gauss-Newton step) with every loss on.
    _, block = method_block(c, "stride_paper")
    assert block.stage1.init == "zero" and block.stage1.steps == 20
    assert block.stage1.w_linearity > 0 and block.stage1.w_stability > 0
    abl = res["ablations"]["stride_paper_no_linearity"]
    assert abl["ablation_of"] == "stride_paper" and "delta_vs_base" in abl
    assert abl["lds"] != res["methods"]["stride_paper"]["lds"]


def test_paper_preset_is_the_adam_recipe_with_the_fixes():
    p = defaults.paper("decoder")
    adam = defaults.decoder_adam()
    assert p.stage1.init == "zero" and p.stage1.steps == adam.stage1.steps > 0
    assert p.stage1.w_linearity > 0 and p.stage1.w_stability > 0 and p.stage1.gate_l2 > 0
    assert p.stage1.basis == "random" and p.stage1.lr_muon > 0  # a learned basis
    c = defaults.paper("classifier").stage1
    assert c.init == "zero" and c.subsets_per_step == 0 and c.fidelity_rows == "all"
    assert c.w_fidelity < 1 and c.gate_l2 > 0
    assert p.responses == "forward"
    assert defaults.preset("default", "decoder") == defaults.decoder()
    with pytest.raises(ConfigError, match="unknown STRIDE preset 'nope'"):
        defaults.preset("nope", "decoder")


@pytest.mark.parametrize(
    "spec, match",
    [
        (dict(damping=1e-2), "needs method=<name>"),
        (dict(method="ekfac", dampin=1e-2), r"config.variants.v: unknown config key 'dampin'"),
        (dict(method="ekfac", preset="paper"), "preset is for method='stride' or 'opspace'"),
        (dict(method="stride", preset="nope"), "unknown STRIDE preset"),
        (dict(method="nope"), "unknown attribution method 'nope'"),
        (dict(method="stride", stage1=dict(rnk=4)), "unknown config key 'stage1.rnk'"),
    ],
)
def test_bad_variants_are_refused(spec, match):
    c = digits_quick.get_config()
    c.variants.v = spec
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_variant_label_and_ablation_base_checks():
    c = digits_quick.get_config()
    c.variants.trak = dict(method="ekfac")
    with pytest.raises(ConfigError, match="the label is a method's name"):
        validate(c)
    c = digits_quick.get_config()
    c.ablations, c.ablation_base = ("no_fidelity",), "graddot"
    with pytest.raises(ConfigError, match="ablation_base must be 'stride' or a STRIDE variant"):
        validate(c)
    c.methods = ("stride", "not_a_variant")
    with pytest.raises(ConfigError, match="unknown attribution method 'not_a_variant'"):
        validate(c)


def test_every_shipped_config_validates():
    """Each experiments/configs file builds and passes ``validate`` (its variants included)."""
    import importlib
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
    names = sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__")
    assert "lm_shakespeare" in names and "sft_chitchat" in names
    for name in names:
        config = importlib.import_module(f"experiments.configs.{name}").get_config()
        if "task" not in config:  # the pretraining config has no task
            continue
        if config.model.get("source") in ("hf", "gguf") and not config.model.path:
            config.model.path = "/a/model/dir"  # lm_own.py: the user's model, given per run
        # MiniLM's encoder is fetched by a separate step (experiments.fetch_minilm), which a
        # clean checkout has not run; validate checks for it, so leave it out here.
        config.methods = tuple(m for m in config.methods if m != "minilm")
        validate(config)
