"""The one place that knows about orbax, plus atomic array files for cached stage outputs.

Stage-1 training state goes through an orbax ``CheckpointManager`` (atomic, keep-last-N,
restored into an abstract target). Finished stage outputs (base model, ground truth,
responses, scores) are small .npz files written to a temporary name and renamed, so a job
killed mid-write never leaves a half-written file that a restart would trust; they get the
mode a plain ``open()`` gives (0644 under umask 022). In a multi-process run only process 0
writes or deletes files, while the others wait (``distributed.exclusive``); orbax coordinates
its own multi-host saves.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from stride_jax import distributed


class CheckpointError(ValueError):
    """A checkpoint exists but does not match what the run expects."""


class TrainCheckpoints:
    """Save / restore a training-state pytree every N steps; resume from the latest."""

    def __init__(self, directory: str, keep: int = 2):
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            # Named, so that a manager opened on an existing directory reads its metadata.
            item_handlers=ocp.StandardCheckpointHandler(),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state))
        self._manager.wait_until_finished()

    def restore(self, abstract_state):
        """Restore the latest step into ``abstract_state``'s structure, shapes and shardings."""
        step = self._manager.latest_step()
        # Compare shapes first: a restore that fails on one array abandons the reads of the
        # others, and orbax then reports each abandoned read as an exception it cannot raise.
        mismatch = self._mismatch(step, abstract_state)
        if mismatch:
            raise CheckpointError(
                f"checkpoint at step {step} in {self._manager.directory} does not match this "
                f"run's state (different config?): {mismatch}"
            )
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint at step {step} in {self._manager.directory} does not match this "
                f"run's state (different config?): {e}"
            ) from e

    def _mismatch(self, step: int, abstract_state) -> str | None:
        """Why the arrays saved at ``step`` cannot fill ``abstract_state`` (their number or
        their shapes differ), or None; None too when orbax has no metadata. Shapes are compared
        as multisets: the saved tree's flattening order need not be the state's."""
        try:
            saved = self._manager.item_metadata(step)
        except Exception:  # noqa: BLE001 - no readable metadata: the restore itself decides
            return None
        saved = getattr(saved, "tree", saved)
        if saved is None:
            return None
        flat = jax.tree_util.tree_leaves_with_path
        got = collections.Counter(tuple(getattr(x, "shape", ())) for _, x in flat(saved))
        want = [(jax.tree_util.keystr(p), tuple(x.shape)) for p, x in flat(abstract_state)]
        if sum(got.values()) != len(want):
            return f"it holds {sum(got.values())} arrays, this run's state has {len(want)}"
        for name, shape in want:
            if got[shape] == 0:
                return f"this run's {name} has shape {shape}, which no array saved there has"
            got[shape] -= 1
        return None

    def close(self) -> None:
        self._manager.close()


def guard_config(path: str, config_slice: dict) -> None:
    """Tie the cached output at ``path`` to the config that makes it.

    The first call records ``config_slice`` in ``path.config.json``; later calls with another
    config raise ``CheckpointError`` instead of silently reusing a stale result.
    """
    meta = path + ".config.json"
    if os.path.exists(meta):
        with open(meta) as f:
            if json.load(f) != json.loads(json.dumps(config_slice)):
                raise CheckpointError(
                    f"{path} was made with a different config; use a new --workdir or delete it"
                )
    else:
        record_config(path, config_slice)


def claim(path: str, config_slice: dict, *dependents: str) -> list[str]:
    """Tie the stage output at ``path`` to the config that makes it, replacing a stale one.

    When ``path.config.json`` records another config, the output at ``path`` (a file or a
    directory) and ``dependents`` (e.g. its partial file) are deleted and the new config is
    recorded, so that stage is recomputed while stages keyed by unchanged slices are reused.
    Returns the dotted config keys that changed (empty when nothing stale was dropped)."""
    new = json.loads(json.dumps(config_slice))
    old = recorded_config(path)
    if old == new:
        return []
    changed = []
    if old is not None:  # stale: drop what the old config made
        changed = changed_keys(old, new) or ["(layout)"]
        remove(path, *dependents)
    record_config(path, new)
    return changed


def remove(*paths: str) -> None:
    """Delete each of ``paths`` that exists (a file or a directory); in a multi-process run
    process 0 deletes while the others wait."""
    with distributed.exclusive(f"remove {paths[0]}") as writer:
        for p in paths if writer else ():
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def recorded_config(path: str) -> dict | None:
    """The config recorded beside ``path`` (None when there is none)."""
    meta = path + ".config.json"
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        return json.load(f)


def record_config(path: str, config_slice: dict) -> None:
    """Write ``path.config.json``: the config that made the output at ``path`` (what
    ``guard_config`` compares against), replacing any earlier record."""
    save_json(path + ".config.json", json.loads(json.dumps(config_slice)))


def _umask() -> int:
    """The process umask. Linux reports it in /proc/self/status; elsewhere reading it means
    setting it, so it is set straight back (a brief process-wide change)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, then rename it to ``path``. The file
    gets the mode ``open()`` would give (0o666 minus the umask: 0644 under umask 022), not
    ``mkstemp``'s private 0600, so the group and others can read a run's outputs. Only the
    writer process writes; the others wait for it (``distributed.exclusive``)."""
    with distributed.exclusive(f"write {path}") as writer:
        if writer:
            _write_renamed(path, write)


def _write_renamed(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_arrays(path: str, **arrays) -> None:
    """Atomically write a .npz of host copies of ``arrays``."""
    host = {k: distributed.to_host(v) for k, v in arrays.items()}
    _atomic_write(path, lambda f: np.savez(f, **host))


def load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def save_npy(path: str, array) -> None:
    host = distributed.to_host(array)  # on every process: gathering may take all of them
    _atomic_write(path, lambda f: np.save(f, host))


def save_json(path: str, obj) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def save_params(path: str, params) -> None:
    """Flatten an ``nnx.State`` / pytree of arrays into an atomic .npz."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    save_arrays(path, **{jax.tree_util.keystr(k): v for k, v in leaves})


def load_params(path: str, abstract_params):
    """Load ``save_params`` output into the structure of ``abstract_params``; checks shapes."""
    arrays = load_arrays(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    out = []
    for key_path, leaf in leaves:
        name = jax.tree_util.keystr(key_path)
        if name not in arrays:
            raise CheckpointError(f"{path} lacks parameter {name}")
        if arrays[name].shape != tuple(leaf.shape):
            raise CheckpointError(
                f"{path}: parameter {name} has shape {arrays[name].shape}, expected {leaf.shape}"
            )
        out.append(arrays[name])
    return jax.tree_util.tree_unflatten(treedef, out)
