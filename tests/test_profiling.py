"""profiling: peak memory of a block of work, and blocking on every array a method state holds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax import profiling


@dataclasses.dataclass
class _State:
    w: jax.Array
    nested: list
    note: str = "not an array"


def test_block_all_reaches_arrays_inside_dataclasses_lists_and_dicts(monkeypatch):
    seen = []
    original = jax.block_until_ready

    def record(x):
        seen.extend(leaf for leaf in jax.tree_util.tree_leaves(x) if isinstance(leaf, jax.Array))
        return original(x)

    monkeypatch.setattr(jax, "block_until_ready", record)
    a, b, c = jnp.ones(2), jnp.zeros(3), jnp.arange(4)
    state = [_State(a, [{"k": b}, _State(c, [])])]
    assert profiling.block_all(state) is state
    assert {id(x) for x in seen} == {id(a), id(b), id(c)}
    # Plain jax.block_until_ready treats a dataclass as one opaque leaf and blocks nothing.
    seen.clear()
    jax.block_until_ready(state)
    assert seen == []


def test_peak_memory_sees_a_large_allocation():
    with profiling.PeakMemory() as mem:
        big = np.ones((64, 1024, 1024), np.float32)  # 256 MiB
        big.sum()
    assert mem.peak_mb > 100
