"""stride-jax: STRIDE training-data attribution (steering operators + sparse recovery) in JAX.

Typical use::

    import stride_jax

    task = stride_jax.tasks.classifier(model, train=(x, y), queries=(xq, yq), retrain=recipe)
    scores_QxE = stride_jax.attribute(task, method="stride")  # or "trak", "ekfac", ...
    print(stride_jax.evaluate.lds(task, scores_QxE)["lds"])

Progress: ``attribute`` and ``evaluate.lds`` print this package's INFO lines to stderr while
they run (``verbose=False`` silences one call, ``stride_jax.set_verbosity("warning")`` all).
Own data: ``stride_jax.datasets.from_arrays(x_train, y_train, x_query, y_query)``.

Importing the package is cheap: submodules (and the heavy stacks behind the language-model
and text baselines: transformers, tokenizers, scikit-learn) load when first used.
"""

import importlib

# name -> (module, attribute or None for the module itself)
_EXPORTS = {
    "attribute": ("stride_jax.api", "attribute"),
    "method_config": ("stride_jax.api", "method_config"),
    "tasks": ("stride_jax.tasks", None),
    "methods": ("stride_jax.methods", None),
    "evaluate": ("stride_jax.evaluate", None),
    "datasets": ("stride_jax.datasets", None),
    "set_verbosity": ("stride_jax.logs", "set_verbosity"),
    "Task": ("stride_jax.task", "Task"),
    "Dataset": ("stride_jax.data.dataset", "Dataset"),
    "Splits": ("stride_jax.data.dataset", "Splits"),
    "load_digits": ("stride_jax.data.dataset", "load_digits"),
    "load_npz": ("stride_jax.data.dataset", "load_npz"),
    "make_splits": ("stride_jax.data.dataset", "make_splits"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stride_jax' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
