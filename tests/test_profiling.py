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


def test_compile_time_counts_new_programs_only():
    """``CompileTime`` sees a new jitted program's compilation (seconds > 0, one program) and
    nothing for a second call of the same program, nor after its block has ended."""
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + x.sum())
    x = jnp.arange(7.0)
    with profiling.CompileTime() as first:
        f(x).block_until_ready()
    with profiling.CompileTime() as again:
        f(x).block_until_ready()
    assert first.seconds > 0 and first.programs == 1
    assert again.seconds == 0 and again.programs == 0
    jax.jit(lambda x: jnp.cos(x) - 1.0)(x).block_until_ready()  # outside: not counted
    assert first.programs == 1 and again.programs == 0
