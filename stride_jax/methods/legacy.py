"""TRANSITIONAL: methods not yet rewritten against the task protocol, registered from the old
per-kind implementations in ``stride_jax.baselines``. Each entry leaves this module when its
method gets one implementation; the module goes when it is empty."""

from __future__ import annotations

import inspect
import sys

from stride_jax import methods


def _defaults_of(method, name: str):
    module = sys.modules[method.fit.__module__]
    if not hasattr(module, "default_config"):
        return None
    takes_name = inspect.signature(module.default_config).parameters
    return module.default_config(name) if takes_name else module.default_config()


def _register_all() -> None:
    from stride_jax import baselines  # noqa: F401 - importing registers the old methods
    from stride_jax.baselines import base

    per_kind = {"classifier": base.REGISTRY, "decoder": base.LM_REGISTRY}
    for name in sorted(set(base.REGISTRY) | set(base.LM_REGISTRY)):
        if name in methods.REGISTRY:
            continue
        impl = {k: reg[name] for k, reg in per_kind.items() if name in reg}

        def fit(task, cfg, _impl=impl):
            return _impl[task.kind].fit(task, cfg)

        def score(task, state, query, cfg, _impl=impl):
            return _impl[task.kind].score(task, state, query, cfg)

        def default_config(kind, _impl=impl, _name=name):
            if _name == "stride":
                from stride_jax.stride import defaults

                return defaults.default(kind)
            return _defaults_of(_impl[kind], _name)

        methods.register(name, fit, score, default_config=default_config, kinds=tuple(impl))


_register_all()
