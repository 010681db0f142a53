"""The one place that knows about meshes, NamedSharding and PartitionSpecs.

Mesh axes: ``data`` (queries, examples, retrained models) and ``ops`` (steering operators /
subsets). Hot paths are jitted with explicit in/out shardings built here, so running on more
devices changes only the mesh, never the code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from stride_jax.errors import ConfigError

DATA, OPS = "data", "ops"


def make_mesh(data: int = 1, ops: int = 1, devices=None) -> Mesh:
    """A (data, ops) mesh; -1 on one axis takes all remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and ops == -1:
        raise ConfigError("at most one mesh axis may be -1")
    if data == -1:
        data = n // ops
    if ops == -1:
        ops = n // data
    if data < 1 or ops < 1 or data * ops > n:
        raise ConfigError(f"mesh data={data} x ops={ops} needs more than the {n} devices present")
    grid = np.array(devices[: data * ops]).reshape(data, ops)
    return Mesh(grid, (DATA, OPS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def along(mesh: Mesh, axis: str, ndim: int, dim: int = 0) -> NamedSharding:
    """Shard dimension ``dim`` of an ``ndim``-array along mesh ``axis``; replicate the rest."""
    spec = [None] * ndim
    spec[dim] = axis
    return NamedSharding(mesh, P(*spec))


def pad_to_multiple(x: jax.Array, multiple: int, axis: int = 0):
    """Pad ``axis`` of x with its last row up to a multiple; returns (padded, original length)."""
    n = x.shape[axis]
    extra = (-n) % multiple
    if extra == 0:
        return x, n
    last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    return jnp.concatenate([x, jnp.repeat(last, extra, axis=axis)], axis=axis), n


def check_divisible(name: str, size: int, mesh: Mesh, axis: str) -> None:
    if size % mesh.shape[axis]:
        raise ConfigError(
            f"{name}={size} must be a multiple of the mesh's {axis!r} axis size {mesh.shape[axis]}"
        )
