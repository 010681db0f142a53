"""Peak memory of a block of work: host RSS sampled in a thread, plus device peak if known.

On CPU the number is the peak increase of the process's resident set over its value at
entry (XLA's CPU buffers live there); on GPU, the device allocator's peak bytes in use.
``CompileTime`` sums the seconds jax spends compiling during a block of work.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import jax

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.peak_mb`` (MB above the level at entry)."""

    def __init__(self, interval_s: float = 0.01):
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak_mb = 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(self._interval)

    def __enter__(self):
        self._start = self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = (self._peak - self._start) / 2**20
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            self.peak_mb = stats["peak_bytes_in_use"] / 2**20
        return False


# jax's own compile events: tracing to a jaxpr, lowering to MLIR, XLA's backend compilation.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class CompileTime:
    """``with CompileTime() as ct: ...`` then ``ct.seconds`` (tracing, lowering and XLA
    compilation of every jitted program built in the block) and ``ct.programs`` (how many
    XLA compilations). Blocks may nest; a persistent-cache hit compiles nothing."""

    def __init__(self):
        self.seconds, self.programs = 0.0, 0

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        del kwargs
        if event in _COMPILE_EVENTS:
            self.seconds += duration
            self.programs += event == _COMPILE_EVENTS[-1]

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)
        return False


def block_all(state):
    """``jax.block_until_ready`` that also reaches arrays held in dataclasses (method states
    such as TRAK's per-model records are plain dataclasses, not pytrees), lists and dicts, so
    that timing ``fit`` measures its work rather than its dispatch. Returns ``state``."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        for field in dataclasses.fields(state):
            block_all(getattr(state, field.name))
    elif isinstance(state, list | tuple):
        for item in state:
            block_all(item)
    elif isinstance(state, dict):
        for item in state.values():
            block_all(item)
    else:
        jax.block_until_ready(state)
    return state
