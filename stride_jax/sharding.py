"""The one place that knows about meshes, NamedSharding and PartitionSpecs.

Mesh axes: ``data`` (rows: training rows, queries) and ``ops`` (steering operators /
subsets). Work that has no operator axis (encoding rows, retraining models) splits its
leading axis over every device (``EVERY``: both axes flattened). Hot paths are jitted with
explicit in/out shardings built here, so running on more devices changes only the mesh, never
the code; per-device loops (a scan over a device's own rows, a solve of its own right-hand
sides) go through ``shard_map`` with the specs built here.

Who shards what (each jitted with explicit in/out shardings):

- stage 1, Adam recipe (``stage1``): gates and their optimizer moments over ``ops``;
- stage 1, Gauss-Newton recipe (``newton``): the curvature and gradients accumulated over row
  chunks split on ``data`` (a psum), the solve's right-hand sides split over ``ops``;
- responses (``responses``, ``residual``): queries over ``data`` x operators over ``ops``;
- the Lasso (``recover``): queries over ``data``;
- the decoder's encode (``residual.encode``): rows over ``EVERY``;
- retrains (``eval.groundtruth``, ``tasks.decoder_task``): models over ``EVERY``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from stride_jax import distributed
from stride_jax.errors import ConfigError

DATA, OPS = "data", "ops"
EVERY = (DATA, OPS)


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


def size(mesh: Mesh, axis: str | tuple | None = None) -> int:
    """Devices along ``axis`` (a name, a tuple of names such as ``EVERY``; None: all)."""
    if axis is None:
        return int(mesh.size)
    names = (axis,) if isinstance(axis, str) else axis
    return int(np.prod([mesh.shape[a] for a in names]))


def spec(*axes) -> P:
    """A PartitionSpec: one entry (a mesh axis name, a tuple of names, or None) per leading
    dimension; ``spec()`` replicates."""
    return P(*axes)


def named(mesh: Mesh, specs):
    """NamedShardings for a pytree of PartitionSpecs (or one spec)."""
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def over_every(mesh: Mesh) -> NamedSharding:
    """The leading axis split over every device of the mesh (rows to encode, models)."""
    return NamedSharding(mesh, P(EVERY))


def operator_specs(tree, num_subsets: int):
    """Specs for a tree holding operators: every 3-D leaf with a leading T axis (gates, and
    their optimizer moments) splits that axis over ``ops``; the rest is replicated."""

    def rule(x):
        if hasattr(x, "shape") and x.ndim == 3 and x.shape[0] == num_subsets:
            return P(OPS)
        return P()

    return jax.tree_util.tree_map(rule, tree)


def flat_specs(specs) -> tuple:
    """(tuple of the PartitionSpecs of a spec tree, its treedef): hashable, for jit caches."""
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=lambda x: isinstance(x, P))
    return tuple(leaves), treedef


def pad_operators(tree, num_subsets: int, multiple: int):
    """The operator leaves of ``tree`` (``operator_specs``) padded along T to a multiple."""

    def pad(x):
        if hasattr(x, "shape") and x.ndim == 3 and x.shape[0] == num_subsets:
            return pad_to_multiple(x, multiple)[0]
        return x

    return jax.tree_util.tree_map(pad, tree)


def put(tree, shardings):
    """``tree`` moved onto ``shardings`` (a pytree prefix of it): ``distributed.put``, which
    on one process is ``jax.device_put``."""
    return distributed.put(tree, shardings)


def jit(fn, in_shardings, out_shardings):
    """``jax.jit`` with explicit in/out shardings whose arguments are first moved onto their
    shardings (a no-op when they are there): a cache split over rows may feed a step that
    wants it replicated, or a query set on one device a step split over ``data``. The move
    is ``distributed.put``: on one process ``jax.device_put``; on several, also a
    process-local array onto a sharding over every process's devices."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)

    def call(*args):
        return jitted(*put(args, tuple(in_shardings)))

    return call


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """``fn`` run once per device on its own blocks (``jax.shard_map``; collectives such as
    ``jax.lax.psum`` name the mesh axes). Replication checks are off: scans whose carries
    start replicated and pick up per-device values are the point."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
