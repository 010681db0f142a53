"""Top-k removal: does removing the training examples a method ranks highest for a query
raise that query's loss more than removing as many random examples? (paper, appendix B.6)

For a seeded sample of ``num_queries`` of the run's queries, each method, each k in ``ks``
and each sampled query: the query's k highest-scored training examples (equal scores: lower
example index first) are removed and a model is retrained with the task's own recipe on the
rest, once per retrain seed (``seeds`` keys, the same keys for every removal and for the
full-data reference, so differences are paired by seed). The *rise* is the query's loss
after the removal minus its loss under the full-data retrain with the same seed, averaged
over the seeds; a classifier also reports the *probability drop* of the true class,
p = exp(-cross-entropy), full minus removed. The baseline removes k random examples per
query (a seeded permutation per query, its first k). Each statistic is the mean over the
sampled queries with a bootstrap 95% CI (``metrics.paired_difference`` against zero), and
each method's difference to random is paired over the queries ("beats random": its CI lies
above zero). Per query, removal.json keeps the rise and the removed examples' indices.

All retrains (methods x ks x queries x seeds, the random removals and the full-data models)
go through one ``task.retrain_losses`` call: vmapped in groups chosen from the free memory
(``group=0``) with progress lines (rate, ETA), evaluated on the sampled query rows, from
which each model's own query is read.

``job(config, workdir)`` is experiments/removal.py: ``config.apps.removal`` is checked
against the data before any model is trained, the run opened (``apps.run.open_run``) and
``WORKDIR/removal.json`` written; ``format_table`` prints it.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from stride_jax.apps import config as apps_config
from stride_jax.apps import run as apps_run
from stride_jax.errors import ConfigError
from stride_jax.eval import metrics


def check(cfg, num_examples: int, num_queries: int) -> tuple[tuple[int, ...], int, int]:
    """``(ks, num_queries, seeds)`` of ``config.apps.removal`` (``cfg``) for E training
    examples and Q queries, or a ``ConfigError`` naming the bad key; needs no model."""
    ks = apps_config.counts(
        cfg.ks,
        "removal.ks",
        num_examples - 1,
        f"at least one of the {num_examples} training examples must remain",
    )
    nq = cfg.num_queries or num_queries  # 0: every query
    apps_config.counts((nq,), "removal.num_queries", num_queries, "the run's queries; 0: all")
    seeds = cfg.seeds
    if not (isinstance(seeds, int) and seeds >= 1):
        raise ConfigError(f"config.apps.removal.seeds must be an integer >= 1, got {seeds!r}")
    return ks, nq, seeds


def top_k(scores_VxE, k: int) -> np.ndarray:
    """removed_VxK: per row, the indices of the k highest scores (equal: lower index first)."""
    s = np.asarray(scores_VxE, np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def removal_masks(removed_VxK, num_examples: int) -> np.ndarray:
    """masks_VxE (float32): 1 everywhere but at each row's removed examples."""
    masks = np.ones((len(removed_VxK), num_examples), np.float32)
    np.put_along_axis(masks, np.asarray(removed_VxK, np.int64), 0.0, axis=1)
    return masks


def _stats(values_V, baseline_V, n_boot: int) -> dict:
    """Mean over queries with a bootstrap 95% CI (paired with ``baseline_V``)."""
    return metrics.paired_difference(values_V, baseline_V, n_boot=n_boot)


def own_query_losses(task, keys_S, masks_RxE, rows) -> tuple[np.ndarray, np.ndarray]:
    """``(after_RxS, full_SxV)``: removal r's retrain with seed s on its own query (removal
    r belongs to query ``r % V``; V = ``len(rows)``) and the full-data retrains on every
    query, from one ``task.retrain_losses`` call over the R removals and the full data."""
    r, s, v = len(masks_RxE), len(keys_S), len(rows)
    masks = np.concatenate([masks_RxE, np.ones((1, masks_RxE.shape[1]), np.float32)])
    logging.info("removal: %d retrains (%d removals + full data, x %d seeds)", (r + 1) * s, r, s)
    losses_MxV = task.retrain_losses(
        keys_S[np.tile(np.arange(s), r + 1)],
        task.example_weights(np.repeat(masks, s, axis=0)),
        rows,
        group=0,
        label="removal retrains",
    )
    losses = np.asarray(losses_MxV, np.float64).reshape(r + 1, s, v)
    return losses[np.arange(r), :, np.arange(r) % v], losses[-1]


def run(ctx, scores_by_method: dict, cfg) -> dict:
    """The removal results of the module doc for ``{method: scores_QxE}`` on the run's
    queries (a ``"random"`` entry is ignored: random removal is the baseline) under
    ``config.apps.removal`` ``cfg``."""
    task, query = ctx.task, ctx.splits.query
    e, q = task.num_examples, len(query)
    ks, nq, num_seeds = check(cfg, e, q)
    names = [m for m in scores_by_method if m != "random"]
    for name in names:
        shape = np.shape(scores_by_method[name])
        if shape != (q, e):
            raise ValueError(f"{name} scores have shape {shape}, expected ({q}, {e})")
    query_key, random_key, retrain_key = jax.random.split(jax.random.key(cfg.seed), 3)
    queries_V = np.sort(np.asarray(jax.random.choice(query_key, q, (nq,), replace=False)))
    perm_VxE = np.stack(
        [
            np.asarray(jax.random.permutation(jax.random.fold_in(random_key, i), e))
            for i in queries_V
        ]
    )
    # One block of V removals (one per sampled query) per (method, k), random last.
    blocks = [(m, k, top_k(scores_by_method[m][queries_V], k)) for m in names for k in ks]
    blocks += [("random", k, perm_VxE[:, :k]) for k in ks]
    t0 = time.time()
    after_RxS, full_SxV = own_query_losses(
        task,
        jax.random.split(retrain_key, num_seeds),
        np.concatenate([removal_masks(removed, e) for *_, removed in blocks]),
        query.subset(queries_V),
    )
    seconds = time.time() - t0
    v, classifier, n_boot = nq, task.kind == "classifier", ctx.config.lds.n_boot
    zeros_V = np.zeros(v)
    per_block = {}
    for i, (name, k, removed_VxK) in enumerate(blocks):
        after_SxV = after_RxS[i * v : (i + 1) * v].T
        entry = {"rise_V": (after_SxV - full_SxV).mean(axis=0)}
        entry["drop_V"] = (np.exp(-full_SxV) - np.exp(-after_SxV)).mean(axis=0)
        entry["removed"] = removed_VxK.tolist()
        per_block[name, k] = entry
    out = {"random": {}, "methods": {}}
    for (name, k), entry in per_block.items():
        rnd = per_block["random", k]
        res = {"rise": _stats(entry["rise_V"], zeros_V, n_boot)}
        if name != "random":
            res["rise_vs_random"] = _stats(entry["rise_V"], rnd["rise_V"], n_boot)
            res["beats_random"] = bool(res["rise_vs_random"]["ci95"][0] > 0)
        if classifier:
            res["prob_drop"] = _stats(entry["drop_V"], zeros_V, n_boot)
            if name != "random":
                res["prob_drop_vs_random"] = _stats(entry["drop_V"], rnd["drop_V"], n_boot)
        res.update(per_query_rise=entry["rise_V"].tolist(), removed=entry["removed"])
        where = out["random"] if name == "random" else out["methods"].setdefault(name, {})
        where[str(k)] = res
    full = {"loss": float(full_SxV.mean())}
    if classifier:
        full["prob"] = float(np.exp(-full_SxV).mean())
    return {
        "kind": task.kind,
        "num_examples": e,
        "queries": queries_V.tolist(),
        "ks": list(ks),
        "seeds": num_seeds,
        "seed": int(cfg.seed),
        "num_retrains": (len(blocks) * v + 1) * num_seeds,
        "full": full,
        **out,
        "seconds": seconds,
    }


def job(config, workdir: str) -> dict:
    """experiments/removal.py: check, open the run, score, remove, write removal.json."""
    cfg = config.apps.removal
    splits, names = apps_run.load_checked(config, workdir)
    check(cfg, apps_run.num_examples(splits.train), len(splits.query))
    ctx = apps_run.open_run(config, workdir, splits)
    names = [m for m in names if m != "random"]  # random selections are drawn, not scored
    result = run(ctx, apps_run.scores(ctx, names), cfg)
    result["path"] = apps_run.save(workdir, "removal", result)
    return result


def format_table(result: dict) -> str:
    """removal.json as text: per k, each method's rise (and probability drop) against random."""
    prob = result["kind"] == "classifier"
    full = result["full"]
    lines = [
        f"top-k removal: {len(result['queries'])} queries x {result['seeds']} seeds, "
        f"{result['num_examples']} training examples, {result['num_retrains']} retrains in "
        f"{result['seconds']:.0f} s; full-data query loss {full['loss']:.4f}"
        + (f", p(true class) {full['prob']:.3f}" if prob else "")
    ]
    head = f"  {'k':>4} {'method':<10} {'loss rise [95% CI]':>26} {'vs random':>10}"
    lines.append(head + (f" {'p drop [95% CI]':>24} {'vs random':>10}" if prob else ""))
    rows = [("random", result["random"])] + list(result["methods"].items())
    for k in result["ks"]:
        for name, by_k in rows:
            r = by_k[str(k)]
            row = f"  {k:>4} {name:<10} {_cell(r['rise'], 4):>26} "
            row += f"{_diff(r, 'rise_vs_random', 4):>10}" + ("*" if r.get("beats_random") else " ")
            if prob:
                row += f"{_cell(r['prob_drop'], 3):>24} {_diff(r, 'prob_drop_vs_random', 3):>10}"
            lines.append(row.rstrip())
    lines.append("vs random: paired mean difference over the queries; * = its 95% CI is above 0")
    return "\n".join(lines)


def _cell(stat: dict, digits: int) -> str:
    lo, hi = stat["ci95"]
    return f"{stat['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _diff(entry: dict, key: str, digits: int) -> str:
    return f"{entry[key]['mean']:+.{digits}f}" if key in entry else ""
