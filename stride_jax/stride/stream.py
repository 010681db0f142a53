"""Streamed, resumable Lasso scoring: queries in batches, each reduced to its top-k on device.

At scale (N ~ 1e6 training examples, Q ~ 1e5 queries) the Q x N score matrix does not fit in
memory or on disk, and a run takes hours, so :func:`stream_scores` never holds more than one
batch of it. Each batch's responses come from a callable (or a slice of an array), the
batch is solved by :func:`recover.lasso_scores` (which applies A only through its gather
form), its B x N scores are reduced on device to each query's top-k proponents (largest
positive scores) and opponents (most negative scores), and those few numbers are written
atomically. A killed run resumes where it stopped: batches already on disk are skipped, and
the final ``topk.npz`` is byte-identical to an uninterrupted run's.

Layout of ``out_dir``::

    manifest.json       what made the batches (design digest, sizes, Lasso config, key, a
                        description of the responses) and its sha256; a run with another
                        config on the same directory is refused (CheckpointError naming the
                        changed keys) rather than mixing two configs' batches
    batch_<start>.npz   queries start..start+B-1: prop_idx_BxK, prop_score_BxK, opp_idx_BxK,
                        opp_score_BxK (int32 / float32), lam_B, nnz_B
    full_<start>.npy    with keep_full: the batch's B x N float32 scores
    topk.npz            the same keys over all Q queries (``_QxK``, ``lam_Q``, ``nnz_Q``),
                        assembled when every batch is done

The manifest knows the inputs and settings, not the solver's code: batches written before an
upgrade of ``recover`` and after it would be mixed, so finish or delete a half-done out_dir
before upgrading.

Only nonzero scores are kept: a query with fewer than k positive (negative) scores has its
remaining proponent (opponent) slots set to index -1 and score 0. The Lasso is sparse, so
zeros carry no ranking, and padding them out makes the output independent of how top_k
breaks ties among zeros. Equal nonzero scores keep the lower index first (``lax.top_k``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import zipfile
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax import checkpoint, resources
from stride_jax.stride import recover
from stride_jax.stride.subsets import Design

MANIFEST = "manifest.json"
TOPK = "topk.npz"
KEYS_BxK = ("prop_idx", "prop_score", "opp_idx", "opp_score")
_FORMAT = 1
# A fixed timestamp for the members of topk.npz: np.savez stamps the wall clock, which would
# make a resumed run's file differ from an uninterrupted one's in bytes, not in content.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def batch_path(out_dir: str, start: int) -> str:
    """``out_dir/batch_<start>.npz`` (start zero-padded to 9 digits, so names sort by start)."""
    return os.path.join(out_dir, f"batch_{start:09d}.npz")


def full_path(out_dir: str, start: int) -> str:
    """``out_dir/full_<start>.npy``: a batch's B x N scores (written only with keep_full)."""
    return os.path.join(out_dir, f"full_{start:09d}.npy")


@partial(jax.jit, static_argnames="k")
def top_signed(scores_QxN, k: int) -> dict:
    """Per query the k largest positive and the k most negative scores, with their indices.

    Returns ``prop_idx_QxK`` / ``opp_idx_QxK`` (int32; -1 where a query has fewer than k
    scores of that sign) and ``prop_score_QxK`` (descending, > 0) / ``opp_score_QxK``
    (ascending, < 0; 0 in the padded slots).
    """
    neg_inf = jnp.float32(-jnp.inf)
    prop_v, prop_i = jax.lax.top_k(jnp.where(scores_QxN > 0, scores_QxN, neg_inf), k)
    opp_v, opp_i = jax.lax.top_k(jnp.where(scores_QxN < 0, -scores_QxN, neg_inf), k)
    prop_ok, opp_ok = prop_v > neg_inf, opp_v > neg_inf
    return {
        "prop_idx": jnp.where(prop_ok, prop_i, -1).astype(jnp.int32),
        "prop_score": jnp.where(prop_ok, prop_v, 0.0).astype(jnp.float32),
        "opp_idx": jnp.where(opp_ok, opp_i, -1).astype(jnp.int32),
        "opp_score": jnp.where(opp_ok, -opp_v, 0.0).astype(jnp.float32),
    }


def _sha256(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _key_list(key):
    if key is None:
        return None
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).tolist()


def _manifest(
    design: Design, responses, num_queries, lasso_config, topk, query_batch, key, keep_full, tag
) -> dict:
    """What the batches depend on, as a JSON-able dict (the run's identity)."""
    if callable(responses):
        resp = {"kind": "callable", "tag": tag}
    else:
        resp = {"kind": "array", "sha256": _sha256(responses), "tag": tag}
    return {
        "format": _FORMAT,
        "num_examples": design.num_examples,
        "num_subsets": design.num_subsets,
        "design_sha256": _sha256(design.members_TxS, design.subsets_NxD),
        "num_queries": int(num_queries),
        "topk": int(topk),
        "query_batch": int(query_batch),
        "keep_full": bool(keep_full),
        "lasso": dataclasses.asdict(lasso_config),
        "key": _key_list(key),
        "responses": json.loads(json.dumps(resp)),
    }


def _claim(out_dir: str, manifest: dict) -> None:
    """Write the manifest into a new ``out_dir``, or check it against the one there."""
    path = os.path.join(out_dir, MANIFEST)
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("sha256") != digest:
            changed = checkpoint.changed_keys(old.get("config", {}), manifest) or ["(layout)"]
            raise checkpoint.CheckpointError(
                f"{out_dir} holds scores made with another config (changed: "
                f"{', '.join(changed)}); use a new out_dir or delete it"
            )
        return
    if any(name.startswith("batch_") for name in os.listdir(out_dir)):
        raise checkpoint.CheckpointError(
            f"{out_dir} holds batch files but no {MANIFEST}; use a new out_dir or delete it"
        )
    checkpoint.save_json(path, {"config": manifest, "sha256": digest})


def _batch_responses(responses, start: int, stop: int, num_subsets: int) -> np.ndarray:
    y = responses(start, stop) if callable(responses) else responses[start:stop]
    y_BxT = np.asarray(jax.device_get(y), np.float32)
    if y_BxT.shape != (stop - start, num_subsets):
        raise ValueError(
            f"responses for queries {start}:{stop} have shape {tuple(y_BxT.shape)}, "
            f"expected ({stop - start}, {num_subsets})"
        )
    return y_BxT


def _check_args(design, responses, topk, query_batch, num_queries, keep_full, out_dir):
    """Validated number of queries Q (one-line errors for bad arguments)."""
    if not isinstance(design, Design):
        raise ValueError(f"design must be a subsets.Design, got {type(design).__name__}")
    if callable(responses):
        if num_queries is None:
            raise ValueError("num_queries is required when responses is a callable")
    else:
        shape = np.shape(responses)
        if len(shape) != 2 or shape[1] != design.num_subsets:
            raise ValueError(
                f"responses must be (Q, T={design.num_subsets}), got shape {tuple(shape)}"
            )
        if num_queries is not None and num_queries != shape[0]:
            raise ValueError(f"num_queries={num_queries} but responses have {shape[0]} rows")
        num_queries = shape[0]
    if int(num_queries) < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    if not 1 <= int(topk) <= design.num_examples:
        raise ValueError(f"topk must be in [1, N={design.num_examples}], got {topk}")
    if int(query_batch) < 1:
        raise ValueError(f"query_batch must be >= 1, got {query_batch}")
    if keep_full:
        need = 4 * int(num_queries) * design.num_examples
        free = shutil.disk_usage(out_dir).free
        if need > free:
            raise ValueError(
                f"keep_full needs {resources.human_bytes(need)} for {num_queries} x "
                f"{design.num_examples} scores but {out_dir} has {resources.human_bytes(free)} "
                "free; drop keep_full"
            )
    return int(num_queries)


def _save_npz_fixed(path: str, arrays: dict) -> None:
    """Atomically write an uncompressed .npz whose bytes depend only on ``arrays`` (fixed
    member timestamps, sorted names), readable by ``np.load``."""
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]))
    os.replace(tmp, path)


def assemble(out_dir: str, num_queries: int, query_batch: int) -> dict:
    """Concatenate the batch files into ``out_dir/topk.npz``; returns its arrays."""
    parts = []
    for start in range(0, num_queries, query_batch):
        part = checkpoint.load_arrays(batch_path(out_dir, start))
        rows = min(start + query_batch, num_queries) - start
        if part["prop_idx_BxK"].shape[0] != rows:
            raise checkpoint.CheckpointError(
                f"{batch_path(out_dir, start)} holds {part['prop_idx_BxK'].shape[0]} queries, "
                f"expected {rows}; delete it to recompute it"
            )
        parts.append(part)
    out = {}
    for name in parts[0]:
        stacked = np.concatenate([p[name] for p in parts])
        out[name.replace("_BxK", "_QxK").replace("_B", "_Q")] = stacked
    _save_npz_fixed(os.path.join(out_dir, TOPK), out)
    return out


def stream_scores(
    design: Design,
    responses,
    lasso_config: recover.LassoConfig,
    out_dir: str,
    topk: int,
    query_batch: int,
    key=None,
    keep_full: bool = False,
    *,
    num_queries: int | None = None,
    max_batches: int | None = None,
    tag=None,
) -> dict:
    """Score all queries batch by batch, keeping each query's top-k; resumable.

    Args:
      design: the T x N :class:`~stride_jax.stride.subsets.Design`.
      responses: ``responses(start, stop) -> y_BxT`` (so that the Q x T responses need never
        be in memory at once; then ``num_queries`` is required) or a (Q, T) array.
      lasso_config: :class:`recover.LassoConfig`; ``key`` is passed to ``lasso_scores``
        (used by ``select="heldout"``, the same held-out rows for every batch).
      out_dir: created if needed; see the module docstring for its layout.
      topk: k, kept per query and sign. query_batch: B, queries per Lasso call. The last
        batch is padded with zero rows to B (one compiled shape; a zero row scores 0).
      keep_full: also write each batch's B x N scores (refused when Q x N floats do not fit
        on the disk).
      max_batches: stop after computing this many new batches (a planned interruption).
      tag: a JSON-able description of a callable's responses (e.g. its seed), recorded in
        the manifest so that changing it is refused like any other config change.

    Returns a summary: ``queries_done`` (``queries_computed`` by this call), ``complete``
    (all batches on disk and topk.npz written), ``batches_computed`` / ``batches_skipped``,
    ``seconds`` per stage (``responses``, ``lasso``, ``reduce_write``, ``assemble``,
    ``total``), ``topk_path``.
    """
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    num_queries = _check_args(design, responses, topk, query_batch, num_queries, keep_full, out_dir)
    manifest = _manifest(
        design, responses, num_queries, lasso_config, topk, query_batch, key, keep_full, tag
    )
    _claim(out_dir, manifest)
    for name in os.listdir(out_dir):  # half-written files of a run killed mid-write
        if name.startswith(".tmp-") or name == TOPK + ".tmp":
            os.remove(os.path.join(out_dir, name))
    starts = list(range(0, num_queries, query_batch))
    done = [s for s in starts if os.path.exists(batch_path(out_dir, s))]
    queries_done = sum(min(s + query_batch, num_queries) - s for s in done)
    progress = resources.Progress("stream_scores", num_queries, "queries", start=queries_done)
    seconds = dict.fromkeys(("responses", "lasso", "reduce_write", "assemble"), 0.0)
    computed = computed_queries = 0
    for start in starts:
        if os.path.exists(batch_path(out_dir, start)):
            continue
        if max_batches is not None and computed >= max_batches:
            break
        stop = min(start + query_batch, num_queries)
        t0 = time.perf_counter()
        y_BxT = np.zeros((query_batch, design.num_subsets), np.float32)
        y_BxT[: stop - start] = _batch_responses(responses, start, stop, design.num_subsets)
        t1 = time.perf_counter()
        out = recover.lasso_scores(design, y_BxT, lasso_config, key)
        jax.block_until_ready(out["scores_QxN"])
        t2 = time.perf_counter()
        kept = jax.device_get(top_signed(out["scores_QxN"], int(topk)))
        rows = {f"{name}_BxK": kept[name][: stop - start] for name in KEYS_BxK}
        rows |= {"lam_B": out["lam_Q"][: stop - start], "nnz_B": out["nnz_Q"][: stop - start]}
        if keep_full:  # before the batch file: its presence means the batch is complete
            checkpoint.save_npy(full_path(out_dir, start), out["scores_QxN"][: stop - start])
        checkpoint.save_arrays(batch_path(out_dir, start), **rows)
        del out
        seconds["responses"] += t1 - t0
        seconds["lasso"] += t2 - t1
        seconds["reduce_write"] += time.perf_counter() - t2
        computed += 1
        computed_queries += stop - start
        queries_done += stop - start
        progress.update(queries_done)
    complete = queries_done == num_queries
    if complete:
        t0 = time.perf_counter()
        assemble(out_dir, num_queries, query_batch)
        seconds["assemble"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    return {
        "num_queries": num_queries,
        "queries_done": queries_done,
        "complete": complete,
        "num_batches": len(starts),
        "batches_computed": computed,
        "batches_skipped": len(done),
        "queries_computed": computed_queries,
        "seconds": seconds,
        "topk_path": os.path.join(out_dir, TOPK) if complete else None,
    }
