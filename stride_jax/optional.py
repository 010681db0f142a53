"""The language-model stack is optional: ``pip install -e ".[lm]"``.

A classifier install (``pip install -e .``) lacks transformers, tokenizers, safetensors, gguf
and chitchat_dataset; nothing on the classifier path imports them. Language-model features
import them through ``require`` when they run, so a missing one ends in one line naming the
extra instead of a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import importlib

from stride_jax.errors import ConfigError

LM_INSTALL = 'pip install -e ".[lm]"'


class MissingExtraError(ConfigError, ImportError):
    """A feature needs a package of an extra that is not installed. A ``ConfigError`` (the
    binaries print it as one line) and an ``ImportError`` (what callers probing for an optional
    package catch)."""


def require(module: str, feature: str):
    """``import module`` for ``feature`` (e.g. "reading GGUF files"), or a
    ``MissingExtraError`` naming the `lm` extra when the package is not installed. An import
    that fails inside an installed package (a broken install) is re-raised unchanged."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise
        raise MissingExtraError(
            f"{feature} needs the language-model extra ({top} is not installed): {LM_INSTALL}"
        ) from e
