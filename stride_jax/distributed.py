"""Multi-host runs on JAX's own multi-controller runtime, and the persistent compilation cache.

Every process runs the same program: the same jitted computations in the same order, over one
mesh of all processes' devices (``jax.devices()`` is global once ``initialize`` ran). Only
process 0 (the *writer*) writes files; the others skip each write and meet it at a barrier
before and after (``exclusive``), so every process sees the same workdir whenever it decides
whether a cached stage exists (a process that found a file its peer had just written would
skip computations the others run, and the run would hang). The workdir must be one shared
filesystem path on every host. A single process (no flags) does no barriers and writes as
before.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from absl import logging

from stride_jax.errors import ConfigError


def check_flags(coordinator_address: str | None, num_processes, process_id) -> bool:
    """Whether the flags ask for a multi-process run; a bad combination raises ``ConfigError``.

    ``--coordinator_address=host:port`` and ``--num_processes`` come together (>= 1) and then
    ``--process_id`` is required, in ``[0, num_processes)``; none of them means one process."""
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if not any(given):
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ConfigError(
            "--coordinator_address, --num_processes and --process_id go together "
            f"(got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r})"
        )
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator_address must be host:port, got {coordinator_address!r}")
    if num_processes < 1:
        raise ConfigError(f"--num_processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process_id must be in [0, {num_processes}) for --num_processes={num_processes}, "
            f"got {process_id}"
        )
    return True


def initialize(coordinator_address: str | None, num_processes, process_id) -> None:
    """``jax.distributed.initialize`` when the flags ask for several processes (checked by
    ``check_flags``); nothing for one. Call before any JAX computation. On CPU, cross-process
    collectives need gloo, selected here (it changes nothing on other backends)."""
    if not check_flags(coordinator_address, num_processes, process_id):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def set_compilation_cache(directory: str | None) -> None:
    """Keep XLA's compiled programs in ``directory`` (JAX's persistent compilation cache), so a
    rerun, or another binary on the same shapes, loads them instead of compiling; None: as is.
    Every program is kept, not only those that took jax's default 1 s to compile: a STRIDE
    fit's responses, Lasso and design programs take 0.1-0.7 s each on lm_shakespeare."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reached the barrier ``name`` (no-op in one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def exclusive(name: str):
    """``with exclusive(name) as writer: if writer: <change files>``: the writer changes the
    workdir while every other process waits; all leave together, seeing the same files."""
    barrier(f"{name}:enter")
    try:
        yield is_writer()
    finally:
        barrier(f"{name}:exit")


def mesh_axes(data: int, ops: int) -> tuple[int, int]:
    """The config's ``(data, ops)`` mesh axes, widened in a multi-process run to every
    process's devices along ``data`` (each process must hold part of the mesh to run the jitted
    computations on it): rows, queries and retrained models are then split across hosts."""
    n = jax.device_count()
    if not is_multiprocess() or -1 in (data, ops) or data * ops == n:
        return data, ops
    if n % ops:
        raise ConfigError(f"mesh.ops={ops} must divide the {n} devices of all processes")
    logging.info(
        "auto: mesh data=%d x ops=%d over the %d devices of all processes", n // ops, ops, n
    )
    return n // ops, ops


def agreed(value: int) -> int:
    """Process 0's ``value`` on every process: what a process measured for itself (free
    memory) and that sizes a jitted computation must be the same everywhere, or the processes
    would run different programs."""
    if not is_multiprocess():
        return value
    from jax.experimental import multihost_utils

    # As two int32 halves: without x64, JAX would truncate an int64.
    hi_lo = np.array([value >> 20, value & (2**20 - 1)], np.int32)
    hi, lo = (int(v) for v in multihost_utils.broadcast_one_to_all(hi_lo))
    return (hi << 20) | lo


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also places arrays living on this process's
    devices onto a sharding spread over several processes (which ``jax.device_put`` refuses):
    such an array goes through the host, every process holding the same value (they run the
    same program). One process: exactly ``jax.device_put``."""
    if not is_multiprocess():
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if sharding is None:
            return x
        local = isinstance(x, jax.Array) and x.is_fully_addressable
        if not local or sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: via their data
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    def subtree(sharding, xs):  # ``shardings`` may be a prefix of ``tree``
        return jax.tree.map(lambda x: one(x, sharding), xs)

    is_sharding = lambda s: s is None or isinstance(s, jax.sharding.Sharding)  # noqa: E731
    return jax.tree.map(subtree, shardings, tree, is_leaf=is_sharding)


def to_host(x) -> np.ndarray:
    """A host copy of the whole of ``x`` on every process, also of a ``jax.Array`` spread over
    several processes' devices (which ``np.asarray`` refuses)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
