"""Workdir stage caches, each tied to the config slice that made it.

A stage's output is reused on a restart only when the config slice that stage reads is the
one recorded beside it. When that slice changed, the stale output is dropped and the stage
recomputed (logged with the keys that changed), while stages whose slices did not change are
reused: changing a STRIDE or Lasso setting keeps the base model and the ground truth. Outputs
are written atomically (``checkpoint``), and scores record their config only once saved, so a
killed job leaves no claim a restart would trust.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from stride_jax import checkpoint


def guarded(workdir: str, name: str, config_slice: dict, *dependents: str) -> str:
    """Path of the cached stage output ``name``; one built from another config slice is
    dropped (with ``dependents``, e.g. its partial file) so the stage is recomputed."""
    path = os.path.join(workdir, name)
    replaced(name, checkpoint.claim(path, config_slice, *dependents))
    return path


def replaced(name: str, changed: list[str]) -> None:
    """Log that the cached ``name`` was made with another config and is being recomputed."""
    if changed:
        shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        logging.warning("%s: config changed (%s); recomputing it", name, shown)


def save_tree(path: str, tree) -> None:
    """A pytree's leaves as ``p0, p1, ...`` in one .npz (its structure comes from the reader)."""
    leaves = jax.tree.leaves(tree)
    checkpoint.save_arrays(path, **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})


def load_tree(path: str, like):
    """The pytree saved by ``save_tree``, with the structure of ``like``."""
    flat = checkpoint.load_arrays(path)
    leaves, treedef = jax.tree.flatten(like)
    return jax.tree.unflatten(treedef, [jnp.asarray(flat[f"p{i}"]) for i in range(len(leaves))])


def scores(workdir: str, name: str, compute, config_slice: dict):
    """``(scores, meta)`` of ``compute()`` (which returns the same pair), cached as
    ``scores_<name>.npy`` / ``.meta.json`` and tied to ``config_slice`` (the method's config):
    cached scores made with another config are recomputed, never reused. ``meta["seconds"]`` is
    the wall time of ``compute``."""
    path = os.path.join(workdir, f"scores_{name}.npy")
    meta_path = os.path.join(workdir, f"scores_{name}.meta.json")
    if checkpoint.recorded_config(path) is not None:  # a first record waits for the save
        replaced(f"scores_{name}.npy", checkpoint.claim(path, config_slice, meta_path))
    if os.path.exists(path) and os.path.exists(meta_path):
        out = np.load(path)
        with open(meta_path) as f:
            meta = json.load(f)
        logging.info("%s: reusing %s", name, path)
        return out, meta
    t0 = time.time()
    out, meta = compute()
    meta["seconds"] = time.time() - t0
    checkpoint.save_npy(path, out)
    checkpoint.record_config(path, config_slice)
    checkpoint.save_json(meta_path, meta)
    return out, meta
