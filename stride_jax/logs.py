"""Progress output: INFO lines from this package only, on stderr, through absl logging.

The library logs its progress (design, stage 1, responses, Lasso, retrains) with
``absl.logging.info``; absl drops INFO unless asked. Three switches turn it on:

- ``stride_jax.attribute(..., verbose=True)`` / ``stride_jax.evaluate.lds(..., verbose=True)``:
  for that call only; the previous logging state is restored afterwards.
- ``stride_jax.set_verbosity("info")``: for the whole session (``"warning"`` turns it off
  again); calls that leave ``verbose=None`` follow it. Before any ``set_verbosity`` call,
  ``verbose=None`` means on: a notebook sees progress by default.
- the binaries (``stride_jax.job.cli.run_job``): on for the whole run.

"On" means: absl's handler is on the root logger (as under ``absl.app.run``), absl's verbosity
is INFO, and the handler carries the filter ``only_stride_jax_info``, which passes warnings from
everywhere but INFO lines only from this package (JAX, orbax, ... stay quiet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as py_logging

from absl import logging

# absl's verbosity levels by name; Python's levels (logging.INFO, ...) are accepted as well.
_ABSL = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_ABSL |= {"error": logging.ERROR}
_PYTHON = {py_logging.DEBUG: "debug", py_logging.INFO: "info", py_logging.WARNING: "warning"}
_PYTHON |= {py_logging.ERROR: "error"}

_default: int | None = None  # set by set_verbosity: what ``verbose=None`` means
_installed = {"handler": False, "filter": False}  # what set_verbosity added (to undo it)


def only_stride_jax_info(record) -> bool:
    """Log filter: keep warnings from everywhere, INFO only from this package's progress."""
    return record.levelno > 20 or "stride_jax" in record.pathname


def as_level(verbose) -> int:
    """absl's verbosity for ``verbose``: True -> INFO, False -> WARNING, or a level name
    ("debug", "info", "warning", "error"), an absl level or a Python ``logging`` level."""
    if verbose is True or verbose is False:
        return logging.INFO if verbose else logging.WARNING
    if isinstance(verbose, str) and verbose.lower() in _ABSL:
        return _ABSL[verbose.lower()]
    if isinstance(verbose, int) and verbose in _PYTHON:
        return _ABSL[_PYTHON[verbose]]
    if isinstance(verbose, int) and verbose in _ABSL.values():
        return verbose
    raise ValueError(
        f"verbosity must be True, False, one of {sorted(_ABSL)} or a logging level, got {verbose!r}"
    )


@dataclasses.dataclass(frozen=True)
class _State:
    verbosity: int
    root_level: int
    absl_level: int
    handler: bool
    filter: bool


def _capture() -> _State:
    handler = logging.get_absl_handler()
    return _State(
        verbosity=logging.get_verbosity(),
        root_level=py_logging.root.level,
        absl_level=logging.get_absl_logger().level,
        handler=handler in py_logging.root.handlers,
        filter=only_stride_jax_info in handler.filters,
    )


def _apply(level: int) -> dict:
    """Set absl's verbosity to ``level``; at INFO or below, with absl's handler on the root
    logger and the package filter on it. Returns what it added."""
    handler, added = logging.get_absl_handler(), {"handler": False, "filter": False}
    if level >= logging.INFO:
        if handler not in py_logging.root.handlers:
            py_logging.root.addHandler(handler)
            added["handler"] = True
        if only_stride_jax_info not in handler.filters:
            handler.addFilter(only_stride_jax_info)
            added["filter"] = True
    logging.set_verbosity(level)
    return added


def _restore(state: _State) -> None:
    handler = logging.get_absl_handler()
    if not state.filter:
        handler.removeFilter(only_stride_jax_info)
    if not state.handler:
        py_logging.root.removeHandler(handler)
    logging.set_verbosity(state.verbosity)  # moves levels: put back the exact ones after
    py_logging.root.setLevel(state.root_level)
    logging.get_absl_logger().setLevel(state.absl_level)


def set_verbosity(level) -> None:
    """The session-wide switch: ``"info"`` (or True) prints this package's progress from now on,
    ``"warning"`` (or False) only warnings, ``"debug"`` / ``"error"`` as usual. Calls that leave
    ``verbose=None`` follow it."""
    global _default
    level = as_level(level)
    if level < logging.INFO:  # quiet again: take back what an earlier call added
        handler = logging.get_absl_handler()
        if _installed["filter"]:
            handler.removeFilter(only_stride_jax_info)
        if _installed["handler"]:
            py_logging.root.removeHandler(handler)
        _installed.update(handler=False, filter=False)
        logging.set_verbosity(level)
    else:
        added = _apply(level)
        _installed.update({k: _installed[k] or v for k, v in added.items()})
    _default = level


@contextlib.contextmanager
def verbosity(verbose=None):
    """Within the block, log at ``verbose`` (see ``as_level``; None: the level of the last
    ``set_verbosity`` call, INFO before any); the previous logging state is restored after."""
    if verbose is None:
        level = logging.INFO if _default is None else _default
    else:
        level = as_level(verbose)
    state = _capture()
    _apply(level)
    try:
        yield
    finally:
        _restore(state)
