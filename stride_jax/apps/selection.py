"""Data selection: keep the training examples a method ranks highest for a target set of
queries, retrain a fresh model on them alone, and compare it with random selections.

Each aggregation rule turns a score matrix (queries x training examples, higher = the example
lowers the query's loss) into one order of the examples, best first:

- ``rank_greedy``, the paper's rule (appendix D.2, after the greedy rank aggregation of its
  reference [79]): per query the examples are ranked by decreasing score (rank 1 = the highest;
  equal scores ranked by example index, lower first); each example takes its best (smallest)
  rank over the queries; the order is by best rank, equal best ranks by example index. An
  example that is the top one for a single query comes before one that is second for all.
- ``rank_mean``: by decreasing mean score over the queries, equal means by example index.

``select(order_E, k)`` keeps the first k. ``run`` does, for each fraction f of the E training
examples (k = round(f * E)), each method and each rule: retrain a model with the task's own
recipe on the k selected examples only (``task.retrain`` with ``task.example_weights``) and
measure its mean loss on the target set (the run's queries; a classifier also its accuracy).
Every selection of one size uses the same retrain key, so selections differ only in their
data. The floor is ``random_draws`` uniformly random selections of the same size (mean and a
t-based 95% CI over the draws), the reference the full-data model (same key). A method
"beats random" when its loss lies below the random CI (its accuracy above it).

``job(config, workdir)`` is experiments/selection.py: every ``config.apps.selection`` value
is checked against the data before any model is trained, then the run is opened
(``apps.run.open_run``: base model and method scores reused from the workdir) and
``WORKDIR/selection.json`` written; ``format_table`` prints it.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import scipy.stats
from absl import logging

from stride_jax.apps import config as apps_config
from stride_jax.apps import run as apps_run
from stride_jax.errors import ConfigError
from stride_jax.resources import Progress


def _checked_scores(scores_QxE) -> np.ndarray:
    """Scores as float64 (Q x E, both >= 1); NaN ranks last (as -inf)."""
    s = np.asarray(scores_QxE, np.float64)
    if s.ndim != 2 or 0 in s.shape:
        raise ValueError(f"scores must be a non-empty 2-D array (Q x E), got shape {s.shape}")
    return np.where(np.isnan(s), -np.inf, s)


def query_ranks(scores_QxE) -> np.ndarray:
    """ranks_QxE: each example's rank for each query, 1 = the highest score (equal scores
    ranked by example index, lower first)."""
    s = _checked_scores(scores_QxE)
    order_QxE = np.argsort(-s, axis=1, kind="stable")
    ranks_QxE = np.empty_like(order_QxE)
    np.put_along_axis(ranks_QxE, order_QxE, np.arange(1, s.shape[1] + 1)[None], axis=1)
    return ranks_QxE


def rank_greedy(scores_QxE) -> np.ndarray:
    """order_E (example indices, best first) by each example's best rank over the queries;
    equal best ranks by example index."""
    best_E = query_ranks(scores_QxE).min(axis=0)
    return np.argsort(best_E, kind="stable")


def rank_mean(scores_QxE) -> np.ndarray:
    """order_E (example indices, best first) by decreasing mean score over the queries; equal
    means by example index."""
    mean_E = _checked_scores(scores_QxE).mean(axis=0)
    return np.argsort(-mean_E, kind="stable")


AGGREGATES = {"greedy": rank_greedy, "mean": rank_mean}


def select(order_E, k: int) -> np.ndarray:
    """mask_E (bool): True at the first ``k`` examples of ``order_E``."""
    order_E = np.asarray(order_E)
    if not 0 <= int(k) <= order_E.size:
        raise ValueError(f"k must be in 0..{order_E.size}, got {k}")
    mask_E = np.zeros(order_E.size, bool)
    mask_E[order_E[: int(k)]] = True
    return mask_E


def mean_ci95(values) -> dict:
    """``{"mean", "ci95"}`` of a few values: Student-t 95% interval of the mean (NaN bounds
    for a single value)."""
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "ci95": [float("nan"), float("nan")]}
    half = float(scipy.stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def check(cfg, num_examples: int) -> list[tuple[float, int]]:
    """``[(fraction, k)]`` of ``config.apps.selection`` (``cfg``) for E = ``num_examples``,
    or a ``ConfigError`` naming the bad key; needs no model."""
    fractions = tuple(cfg.fractions)
    if not fractions:
        raise ConfigError("config.apps.selection.fractions is empty")
    sizes = []
    for f in fractions:
        f = apps_config.fraction(f, "selection.fractions")
        k = int(round(f * num_examples))
        if not 0 < k < num_examples:
            raise ConfigError(
                f"config.apps.selection.fractions has {f}: of {num_examples} training examples "
                f"it keeps {k} (needs 1..{num_examples - 1})"
            )
        sizes.append((f, k))
    rules = tuple(cfg.aggregate)
    if not rules or any(r not in AGGREGATES for r in rules):
        raise ConfigError(
            f"config.apps.selection.aggregate must name rules among {sorted(AGGREGATES)}, "
            f"got {rules!r}"
        )
    draws = cfg.random_draws
    if not (isinstance(draws, int) and draws >= 2):
        raise ConfigError(
            f"config.apps.selection.random_draws must be an integer >= 2 (a CI needs two "
            f"draws), got {draws!r}"
        )
    return sizes


def _metrics(task, rows, params) -> dict:
    """Mean loss (and accuracy) of ``params`` on the target rows."""
    m = task.row_metrics(rows, params)
    out = {"loss": float(np.mean(m["loss"]))}
    if "correct" in m:
        out["accuracy"] = float(np.mean(m["correct"]))
    return out


def _versus(res: dict, random: dict) -> dict:
    """A selection's numbers with their difference to the random mean and whether they lie
    beyond the random CI (lower loss, higher accuracy)."""
    res["loss_vs_random"] = res["loss"] - random["loss"]["mean"]
    res["beats_random"] = bool(res["loss"] < random["loss"]["ci95"][0])
    if "accuracy" in res:
        res["accuracy_vs_random"] = res["accuracy"] - random["accuracy"]["mean"]
        res["beats_random_accuracy"] = bool(res["accuracy"] > random["accuracy"]["ci95"][1])
    return res


def run(ctx, scores_by_method: dict, cfg) -> dict:
    """The selection results of the module doc for ``{method: scores_QxE}`` (the run's
    queries are the target set; a ``"random"`` entry is ignored: the random draws are that
    baseline) under ``config.apps.selection`` ``cfg``."""
    task, target = ctx.task, ctx.splits.query
    e = task.num_examples
    sizes = check(cfg, e)
    names = [m for m in scores_by_method if m != "random"]
    for name in names:
        shape = np.shape(scores_by_method[name])
        if shape != (len(target), e):
            raise ValueError(f"{name} scores have shape {shape}, expected ({len(target)}, {e})")
    rules = tuple(cfg.aggregate)
    orders = {(m, r): AGGREGATES[r](scores_by_method[m]) for m in names for r in rules}
    draws = int(cfg.random_draws)
    progress = Progress("selection retrains", len(sizes) * (len(orders) + draws + 1))
    done, t0, blocks = 0, time.time(), []
    for f, k in sizes:
        # One retrain key per size: every selection of k examples differs only in its data.
        retrain_key, draws_key = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), k))

        def measure(mask_E, retrain_key=retrain_key):
            nonlocal done
            weight_N = task.example_weights(mask_E[None].astype(np.float32))[0]
            out = _metrics(task, target, task.retrain(retrain_key, weight_N))
            done += 1
            progress.update(done)
            return out

        full = measure(np.ones(e, bool))
        random_draws = [
            measure(select(np.asarray(jax.random.permutation(key, e)), k))
            for key in jax.random.split(draws_key, draws)
        ]
        random = {name: mean_ci95([d[name] for d in random_draws]) for name in full}
        random["draws"] = random_draws
        per_method = {}
        for (name, rule), order_E in orders.items():
            per_method.setdefault(name, {})[rule] = _versus(measure(select(order_E, k)), random)
        blocks.append(
            {"fraction": f, "k": k, "full": full, "random": random, "methods": per_method}
        )
        logging.info("selection: fraction %g (k=%d) done", f, k)
    return {
        "kind": task.kind,
        "num_examples": e,
        "num_target_queries": len(target),
        "methods": names,
        "aggregate": list(rules),
        "random_draws": draws,
        "seed": int(cfg.seed),
        "fractions": blocks,
        "seconds": time.time() - t0,
    }


def job(config, workdir: str) -> dict:
    """experiments/selection.py: check, open the run, score, select, write selection.json."""
    cfg = config.apps.selection
    splits, names = apps_run.load_checked(config, workdir)
    check(cfg, apps_run.num_examples(splits.train))
    ctx = apps_run.open_run(config, workdir, splits)
    names = [m for m in names if m != "random"]  # random selections are drawn, not scored
    result = run(ctx, apps_run.scores(ctx, names), cfg)
    result["path"] = apps_run.save(workdir, "selection", result)
    return result


def format_table(result: dict) -> str:
    """selection.json as text: per fraction, each method and rule against random and full."""
    acc = result["kind"] == "classifier"
    lines = []
    for b in result["fractions"]:
        full, rnd = b["full"], b["random"]
        lines.append(
            f"fraction {b['fraction']:g}: k={b['k']} of {result['num_examples']} examples; "
            f"target: {result['num_target_queries']} queries; full data: loss "
            f"{full['loss']:.4f}" + (f", accuracy {full['accuracy']:.3f}" if acc else "")
        )
        head = f"  {'method':<10} {'rule':<8} {'loss':>8} {'vs random':>10}"
        lines.append(head + (f" {'accuracy':>9} {'vs random':>10}" if acc else ""))
        row = f"  {'random':<10} {'x' + str(result['random_draws']):<8} "
        row += f"{rnd['loss']['mean']:>8.4f} {_half(rnd['loss']):>10} "
        if acc:
            row += f"{rnd['accuracy']['mean']:>9.3f} {_half(rnd['accuracy']):>10}"
        lines.append(row)
        for name, by_rule in b["methods"].items():
            for rule, r in by_rule.items():
                row = f"  {name:<10} {rule:<8} {r['loss']:>8.4f} {r['loss_vs_random']:>+9.4f}"
                row += "*" if r["beats_random"] else " "
                if acc:
                    row += f" {r['accuracy']:>9.3f} {r['accuracy_vs_random']:>+9.3f}"
                    row += "*" if r["beats_random_accuracy"] else " "
                lines.append(row.rstrip())
    lines.append(
        "random: mean of the draws +- the half width of its 95% CI; * = beyond that CI "
        "(lower loss / higher accuracy)"
    )
    return "\n".join(lines)


def _half(stat: dict) -> str:
    lo, hi = stat["ci95"]
    return f"+-{(hi - lo) / 2:.4f}"
