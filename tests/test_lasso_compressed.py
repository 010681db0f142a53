"""``stride.lasso_compressed``: the Lasso settings that replace ``lasso``'s when the design
is compressive (T < N); at T >= N the ``lasso`` block alone."""

import dataclasses

import pytest

from stride_jax.errors import ConfigError
from stride_jax.job import config as job_config
from stride_jax.stride import defaults, method, posterior, recover


def test_decoder_default_switches_lasso_below_n():
    cfg = defaults.decoder()
    full = method.lasso_config(cfg, compressed=False)
    low = method.lasso_config(cfg, compressed=True)
    assert (full.lam_frac, full.path_len, full.maxiter) == (3e-5, 2, 150)
    assert (low.lam_frac, low.path_len, low.maxiter) == (1e-3, 6, 50)
    # everything not overridden is the lasso block's
    same = {k: v for k, v in dataclasses.asdict(low).items() if k not in cfg.lasso_compressed}
    assert same == {k: v for k, v in dataclasses.asdict(full).items() if k in same}
    # classifiers and the other decoder presets override nothing
    for block in (defaults.classifier(), defaults.decoder_residual()):
        assert method.lasso_config(block, True) == method.lasso_config(block, False)


def test_unknown_lasso_compressed_key_is_refused_before_any_work():
    config = job_config.base_config("decoder")
    config.stride.lasso_compressed.lam_fraction = 0.1
    with pytest.raises(ConfigError, match=r"lasso_compressed: unknown Lasso settings \['lam_fr"):
        job_config.validate(config)


@pytest.mark.parametrize("num_subsets, compressed", [(24, False), (12, True)])
def test_stage2_uses_the_compressed_settings_only_below_n(num_subsets, compressed, monkeypatch):
    from conftest import tiny_decoder_task

    _, task = tiny_decoder_task(block_len=12, n_train=24, n_query=2)
    cfg = defaults.decoder()
    cfg.design.update(num_subsets=num_subsets, degree=2)
    cfg.recovery = "lasso"  # the default ("auto") decodes without the Lasso (below)
    seen = []
    real = recover.lasso_scores

    def spy(design, y, config, **kw):
        seen.append(config)
        return real(design, y, config, **kw)

    monkeypatch.setattr(recover, "lasso_scores", spy)
    fitted = method.fit(task, cfg, reuse=False)
    method.score(task, fitted, task.query, cfg)
    assert seen == [method.lasso_config(cfg, compressed)]
    assert seen[0].lam_frac == (1e-3 if compressed else 3e-5)
    seen.clear()
    cfg.recovery = "auto"
    fitted = method.fit(task, cfg, reuse=False)
    method.score(task, fitted, task.query, cfg)
    # the kernel recovery below N, the exact solve at N: no Lasso either way
    want = posterior.Decoder if compressed else posterior.Solve
    assert isinstance(fitted.decoder, want) and not seen
