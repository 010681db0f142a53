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
everywhere but INFO lines only from this package (JAX, orbax, ... stay quiet). A plain stderr
handler on the root logger (``logging.basicConfig``'s, which absl itself installs on its first
log line outside an absl binary) is set aside meanwhile, as ``absl.app.run`` does, so no line
prints twice. Outside a binary, absl starts with one line "WARNING: Logging before flag
parsing goes to stderr." (harmless).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as py_logging
import sys

from absl import logging

# absl's verbosity levels by name; Python's levels (logging.INFO, ...) are accepted as well.
_ABSL = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_ABSL |= {"error": logging.ERROR}
_PYTHON = {py_logging.DEBUG: "debug", py_logging.INFO: "info", py_logging.WARNING: "warning"}
_PYTHON |= {py_logging.ERROR: "error"}

_default: int | None = None  # set by set_verbosity: what ``verbose=None`` means


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


@dataclasses.dataclass
class _Changes:
    """What ``_apply`` did to the handlers, for ``_undo``."""

    added_handler: bool = False
    added_filter: bool = False
    removed: list = dataclasses.field(default_factory=list)  # root's stderr stream handlers

    def merge(self, other: _Changes) -> None:
        self.added_handler |= other.added_handler
        self.added_filter |= other.added_filter
        self.removed += other.removed


_installed = _Changes()  # what set_verbosity changed (undone by set_verbosity("warning"))


def _levels() -> tuple[int, int, int]:
    return (
        logging.get_verbosity(),
        py_logging.root.level,
        logging.get_absl_logger().level,
    )


def _set_levels(levels: tuple[int, int, int]) -> None:
    verbosity, root_level, absl_level = levels
    logging.set_verbosity(verbosity)  # moves the levels below: put back the exact ones after
    py_logging.root.setLevel(root_level)
    logging.get_absl_logger().setLevel(absl_level)


def _apply(level: int) -> _Changes:
    """Set absl's verbosity to ``level``; at INFO or below, first route logging as
    ``absl.app.run`` does (``absl.logging.use_absl_handler``): absl's handler on the root
    logger in place of plain stderr handlers (e.g. the one ``logging.basicConfig`` adds, which
    absl itself calls on its first log line), with the package filter on it."""
    handler, changes = logging.get_absl_handler(), _Changes()
    if level >= logging.INFO:
        root = py_logging.root
        if handler not in root.handlers:
            for h in list(root.handlers):
                if type(h) is py_logging.StreamHandler and h.stream is sys.stderr:
                    root.removeHandler(h)
                    changes.removed.append(h)
            root.addHandler(handler)
            changes.added_handler = True
        if only_stride_jax_info not in handler.filters:
            handler.addFilter(only_stride_jax_info)
            changes.added_filter = True
    logging.set_verbosity(level)
    return changes


def _undo(changes: _Changes) -> None:
    handler = logging.get_absl_handler()
    if changes.added_filter:
        handler.removeFilter(only_stride_jax_info)
    if changes.added_handler:
        py_logging.root.removeHandler(handler)
    for h in changes.removed:
        py_logging.root.addHandler(h)


def set_verbosity(level) -> None:
    """The session-wide switch: ``"info"`` (or True) prints this package's progress from now on,
    ``"warning"`` (or False) only warnings, ``"debug"`` / ``"error"`` as usual. Calls that leave
    ``verbose=None`` follow it."""
    global _default
    level = as_level(level)
    if level < logging.INFO:  # quiet again: take back what an earlier call changed
        _undo(_installed)
        _installed.added_handler = _installed.added_filter = False
        _installed.removed = []
        logging.set_verbosity(level)
    else:
        _installed.merge(_apply(level))
    _default = level


@contextlib.contextmanager
def verbosity(verbose=None):
    """Within the block, log at ``verbose`` (see ``as_level``; None: the level of the last
    ``set_verbosity`` call, INFO before any); the previous logging state is restored after."""
    if verbose is None:
        level = logging.INFO if _default is None else _default
    else:
        level = as_level(verbose)
    levels = _levels()
    changes = _apply(level)
    try:
        yield
    finally:
        _undo(changes)
        _set_levels(levels)
