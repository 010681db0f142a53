"""Tail-patch: does one gradient step on a method's top-k examples help the query more than a
step on k random ones? (The paper's tail-patch score and lift, appendix D.1, Eq. 77-79.)

For each query q (all of them, or ``apps.tailpatch.num_queries`` drawn with ``seed``) and
each k in ``ks``, the base params take ONE plain gradient-descent step of learning rate
``lr`` on the mean loss of the rows of q's top-k examples (its highest scores), and the
score is ``delta_q = loss_q(before) - loss_q(after)``: the change in q's mean per-token
log-probability (a classifier's: its label's log-probability), positive when the step helps
q. The same is measured for q's bottom-k (opponents: expected negative) and for
``random_draws`` random k-sets (averaged per query; shared by every method). Reported per
method and k: the mean delta of top, bottom and random with bootstrap 95% CIs over the
queries, and the lift ``delta(top) - delta(random)`` paired per query: positive means the
method's proponents help more than random examples. (The paper states the lift in the loss'
sign, where negative is good.)

Every (query, k-set) step of one k runs in jitted ``lax.map`` chunks (``BATCH`` steps vmapped
at a time) over padded row-index sets: examples map to rows through ``task.example_weights``
(a decoder example spans a varying number of rows), and the padding rows have weight 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from stride_jax.apps import config as apps_config
from stride_jax.apps import run as apps_run
from stride_jax.errors import ConfigError
from stride_jax.eval import metrics
from stride_jax.resources import Progress

CHUNK = 256  # (query, k-set) steps per jitted call (one compilation per k)
BATCH = 32  # steps vmapped at once inside a call (each holds one gradient of the params)


def settings(config, num_queries: int, num_train: int) -> dict:
    """``apps.tailpatch`` checked against the run's sizes (a ``ConfigError`` naming the key)."""
    tp = config.apps.tailpatch
    ks = apps_config.counts(tp.ks, "tailpatch.ks", num_train, "the training examples")
    lr = tp.lr
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise ConfigError(f"config.apps.tailpatch.lr must be > 0, got {lr!r}")
    nq = tp.num_queries
    if not (isinstance(nq, int) and 0 <= nq <= num_queries):
        raise ConfigError(
            f"config.apps.tailpatch.num_queries must be in 0..{num_queries} (the run's queries; "
            f"0: all), got {nq!r}"
        )
    draws = tp.random_draws
    if not (isinstance(draws, int) and draws >= 1):
        raise ConfigError(f"config.apps.tailpatch.random_draws must be >= 1, got {draws!r}")
    return {"ks": ks, "lr": float(lr), "num_queries": nq or num_queries, "draws": draws}


def example_rows(task) -> np.ndarray:
    """rows_ExR: the row indices of each training example, padded with -1 to the longest."""
    e = task.num_examples
    # example_weights gives each row its example's value: fed the example indices, it
    # returns each row's example.
    example_N = np.asarray(task.example_weights(np.arange(e, dtype=np.float64)[None])[0])
    example_N = example_N.astype(np.int64)
    order = np.argsort(example_N, kind="stable")
    counts_E = np.bincount(example_N, minlength=e)
    rows_ExR = np.full((e, int(counts_E.max())), -1, np.int32)
    starts_E = np.concatenate([[0], np.cumsum(counts_E)[:-1]])
    slot_N = np.arange(len(order)) - np.repeat(starts_E, counts_E)
    rows_ExR[example_N[order], slot_N] = order
    return rows_ExR


def set_rows(rows_ExR: np.ndarray, sets_PxK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(idx_PxM, w_PxM)``: the rows of each example set (M = K x R), 0/1 weights, padding
    rows pointing at row 0 with weight 0."""
    idx_PxM = rows_ExR[np.asarray(sets_PxK)].reshape(len(sets_PxK), -1)
    return np.maximum(idx_PxM, 0), (idx_PxM >= 0).astype(np.float32)


def step_delta(loss_fn, params, train: dict, query: dict, lr, q, idx_M, w_M):
    """``loss_q(params) - loss_q(params - lr * grad)``, the gradient being that of the
    weighted mean loss of the training rows ``idx_M`` (pure; one query row ``q``)."""
    rows = jax.tree.map(lambda a: a[idx_M], train)

    def mean_loss(p):
        return jnp.sum(w_M * loss_fn(p, rows)) / jnp.sum(w_M)

    grads = jax.grad(mean_loss)(params)
    stepped = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    one = jax.tree.map(lambda a: a[q][None], query)
    return loss_fn(params, one)[0] - loss_fn(stepped, one)[0]


def step_deltas(task, params, query_rows, lr, q_P, idx_PxM, w_PxM, label="tail-patch"):
    """delta_P (float32) of ``step_delta`` for every (query row ``q_P``, row set) pair, in
    jitted chunks of ``CHUNK`` pairs (the last one padded), with progress as ``label``."""
    train, query = task.arrays(task.train), task.arrays(query_rows)

    @jax.jit
    def chunk_fn(params, lr, q_C, idx_CxM, w_CxM):
        def one(s):
            return step_delta(task.loss, params, train, query, lr, *s)

        return jax.lax.map(one, (q_C, idx_CxM, w_CxM), batch_size=BATCH)

    p = len(q_P)
    pad = (-p) % CHUNK
    q_P, idx_PxM, w_PxM = (
        np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (q_P, idx_PxM, w_PxM)
    )
    progress, out = Progress(label, p, "steps"), []
    for lo in range(0, p, CHUNK):
        sl = slice(lo, lo + CHUNK)
        out.append(np.asarray(chunk_fn(params, jnp.float32(lr), q_P[sl], idx_PxM[sl], w_PxM[sl])))
        progress.update(min(lo + CHUNK, p))
    return np.concatenate(out)[:p].astype(np.float32)


def top_bottom(scores_SxE: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest and the k lowest scoring examples of each row (ties: lower index)."""
    top = np.argsort(-scores_SxE, axis=1, kind="stable")[:, :k]
    bottom = np.argsort(scores_SxE, axis=1, kind="stable")[:, :k]
    return top, bottom


def random_sets(key, num_sets: int, num_examples: int, k: int) -> np.ndarray:
    """sets_PxK: ``num_sets`` random k-sets of distinct examples."""
    keys = jax.random.split(key, num_sets)
    draw = jax.vmap(lambda kk: jax.random.choice(kk, num_examples, (k,), replace=False))
    return np.asarray(draw(keys))


def mean_ci(values, key, n_boot: int) -> dict:
    """Mean over queries with its bootstrap 95% CI (``metrics.paired_difference`` against 0)."""
    values = np.asarray(values, np.float64)
    return metrics.paired_difference(values, np.zeros_like(values), key=key, n_boot=n_boot)


def patch_sets(task, query_rows, scores_by_method, q_S, rand_PxK, k: int, lr: float):
    """``({method: (top_S, bottom_S)}, random_S)``: the deltas of one step on each query's
    top-k and bottom-k examples by each method, and on the random k-sets ``rand_PxK`` (``P``
    a multiple of S, query-major; averaged per query), all in one ``step_deltas``."""
    names, s = list(scores_by_method), len(q_S)
    sets = [part for n in names for part in top_bottom(scores_by_method[n][q_S], k)]
    sets_PxK = np.concatenate([*sets, rand_PxK])
    draws = len(rand_PxK) // s
    q_P = np.concatenate([np.tile(q_S, 2 * len(names)), np.repeat(q_S, draws)])
    idx, w = set_rows(example_rows(task), sets_PxK)
    delta_P = step_deltas(task, task.params, query_rows, lr, q_P, idx, w, f"tail-patch k={k}")
    split = 2 * len(names) * s
    by_method = dict(zip(names, delta_P[:split].reshape(len(names), 2, s), strict=True))
    return by_method, delta_P[split:].reshape(s, draws).mean(1)


def run(config, workdir: str) -> dict:
    """The tail-patch evaluation of a run config; writes and returns ``tailpatch.json``."""
    splits, names = apps_run.load_checked(config, workdir)
    s = settings(config, len(splits.query), apps_run.num_examples(splits.train))
    ctx = apps_run.open_run(config, workdir, splits=splits)
    scores = apps_run.scores(ctx, names)
    task, e, n_boot = ctx.task, ctx.task.num_examples, config.lds.n_boot
    key_q, key_r, key_ci = jax.random.split(jax.random.key(config.apps.tailpatch.seed), 3)
    q_S = jax.random.choice(key_q, len(splits.query), (s["num_queries"],), replace=False)
    q_S = np.sort(np.asarray(q_S))
    logging.info(
        "tail-patch: %d queries x %d methods, k in %s, %d random draws, lr %g",
        *(len(q_S), len(names), s["ks"], s["draws"], s["lr"]),
    )
    out = {name: {} for name in names}
    for k in s["ks"]:
        rand_PxK = random_sets(jax.random.fold_in(key_r, k), len(q_S) * s["draws"], e, k)
        by_method, rand_S = patch_sets(task, splits.query, scores, q_S, rand_PxK, k, s["lr"])
        for name, (top_S, bottom_S) in by_method.items():
            out[name][str(k)] = {
                "top": mean_ci(top_S, key_ci, n_boot),
                "bottom": mean_ci(bottom_S, key_ci, n_boot),
                "random": mean_ci(rand_S, key_ci, n_boot),
                "lift": metrics.paired_difference(top_S, rand_S, key=key_ci, n_boot=n_boot),
            }
    results = {
        "settings": {**s, "ks": list(s["ks"]), "seed": config.apps.tailpatch.seed},
        "queries": q_S.tolist(),
        "num_train_examples": e,
        "query_loss": float(np.mean(task.row_losses(splits.query.subset(q_S)))),
        "methods": out,
    }
    apps_run.save(workdir, "tailpatch", results)
    return results


def format_table(results: dict) -> str:
    """One row per method and k: mean delta (log-prob gain) of top / bottom / random and the
    lift with its 95% CI."""

    def ci(r):
        return f"{r['mean']:+.2e} [{r['ci95'][0]:+.2e}, {r['ci95'][1]:+.2e}]"

    rows = [("method", "k", "top-k", "bottom-k", "random-k", "lift = top - random (95% CI)")]
    for name, by_k in results["methods"].items():
        for k, r in by_k.items():
            lift = ci(r["lift"])
            rows.append(
                (
                    name,
                    k,
                    f"{r['top']['mean']:+.2e}",
                    f"{r['bottom']['mean']:+.2e}",
                    f"{r['random']['mean']:+.2e}",
                    lift,
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    s = results["settings"]
    lines.append(
        f"{len(results['queries'])} queries, lr {s['lr']:g}, {s['draws']} random draws; delta = "
        f"query loss before - after one step (positive: the step helps); base query loss "
        f"{results['query_loss']:.4f}"
    )
    return "\n".join(lines)
