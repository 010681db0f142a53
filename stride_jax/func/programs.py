"""Jitted passes kept per task, so that a second call compiles nothing.

A method's passes over rows are closures over its task (the model's graph, the layers they
tap, a Fisher, a chunk size). Built afresh on every call, each is a new function to jax, which
traces and compiles it again: on lm_shakespeare that was 3-5 s of every EK-FAC, K-FAC or STRIDE
fit and score, most of their wall time, on every call in a process. ``per_task`` keeps one
jitted closure per task and static key: a later call with arrays of the same shapes and dtypes
reuses the compiled program (other shapes compile once more, as with any ``jax.jit``).

Everything the closure reads at trace time that is not one of its arguments must be in the
key: the parameters, rows and fitted states are arguments, never closed over (baked into a
program as constants, a model's weights would also be compiled into it and held twice). The
store lives on the task (``task.__dict__``), so it goes when the task does; a task whose
model graph is replaced gets new programs (the graph is part of the key).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import jax

_STORE = "_jitted_programs"


def per_task(task, key: Hashable, build: Callable[[], Callable], **jit_kwargs) -> Callable:
    """``jax.jit(build(), **jit_kwargs)``, built once per ``task``, ``key`` and the task's
    model graph. ``build`` takes no arguments: it closes over the task and what ``key``
    names."""
    store = task.__dict__.setdefault(_STORE, {})
    full = (key, getattr(task, "graphdef", None), tuple(sorted(jit_kwargs.items())))
    fn = store.get(full)
    if fn is None:
        fn = store[full] = jax.jit(build(), **jit_kwargs)
    return fn


def memo(task, key: Hashable, compute: Callable[[], object]):
    """``compute()``, kept per ``task``, ``key`` and the task's model graph, as ``per_task``
    keeps programs: for what a call derives by tracing (e.g. ``jax.eval_shape`` of a pass's
    outputs), which would otherwise be traced again on every call."""
    store = task.__dict__.setdefault(_STORE, {})
    full = ("memo", key, getattr(task, "graphdef", None))
    if full not in store:
        store[full] = compute()
    return store[full]


def count(task) -> int:
    """How many jitted programs ``task`` holds (for tests and logs)."""
    return len(task.__dict__.get(_STORE, {}))
