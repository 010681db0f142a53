"""Attribution methods behind one interface (see base.py); importing this registers them all.

Each method module registers its ``fit``/``score`` pair and exposes ``default_config()`` (or
``default_config(name)`` where one module hosts several methods);
``default_configs()`` collects those into the ``baselines`` block of a run config.
"""

import inspect
import sys

import ml_collections

from stride_jax.baselines.base import REGISTRY, Method, Task, as_scores, get, register

__all__ = ["REGISTRY", "Method", "Task", "as_scores", "default_configs", "get", "register"]


def default_configs() -> ml_collections.ConfigDict:
    """``{method name: its default config}`` for every registered method but STRIDE."""
    out = {}
    for name, method in sorted(REGISTRY.items()):
        module = sys.modules[method.fit.__module__]
        if name == "stride" or not hasattr(module, "default_config"):
            continue
        takes_name = inspect.signature(module.default_config).parameters
        out[name] = module.default_config(name) if takes_name else module.default_config()
    return ml_collections.ConfigDict(out)
