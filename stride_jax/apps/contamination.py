"""Contamination audit: does a method find the training copy of a leaked query?

A fraction ``apps.contamination.rate`` of the query rows (drawn with ``seed``, at least one)
leaks into training: for each affected query an exact copy and a perturbed copy
(``task.perturbed``: Gaussian feature noise of ``noise`` standard deviations for a
classifier, a fraction ``token_frac`` of the target tokens replaced for a decoder) are
appended to the training rows. The base model is retrained on that contaminated set with the
task's own recipe, every compared method attributes the queries against it, and for each
affected query we ask where its own copy ranks among the training examples: in the top-k
(the copy lowers the query's loss most), in the bottom-k (signed scores may call it harmful),
in their union (the paper's "extreme buckets", section 5.5 and F.7), against the random
expectation k / E (2k / E for the union). The contaminated model's loss (and accuracy) on
affected vs unaffected queries, beside the clean base model's, shows whether the copies were
memorised at all.

Ranks are 1-based and pessimistic on ties: an example whose score equals the copy's counts
as ranked above it (a method that scores the copy like many others, e.g. 0 after a Lasso,
has not found it).

The contaminated run (base model and every method's scores) is cached in
``<workdir>/contamination-<digest>``, the digest being that of the rate, perturbation and
seed, so a changed setting never reuses a stale model; the clean base model is the run's own
(``<workdir>/base_model.npz``, shared with the other applications).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
from absl import logging

from stride_jax.apps import config as apps_config
from stride_jax.apps import run as apps_run
from stride_jax.errors import ConfigError
from stride_jax.resources import Progress


def perturbation(config) -> float:
    """The perturbed copies' strength for the run's task kind (``Task.perturbed``'s amount),
    checked: feature noise (> 0) for a classifier, the replaced fraction of target tokens
    (in (0, 1]) for a decoder."""
    block = config.apps.contamination
    key = "noise" if config.task == "classifier" else "token_frac"
    value = block[key]
    upper = np.inf if key == "noise" else 1.0
    if not (isinstance(value, (int, float)) and 0.0 < float(value) <= upper):
        interval = "> 0" if key == "noise" else "in (0, 1]"
        raise ConfigError(f"config.apps.contamination.{key} must be {interval}, got {value!r}")
    return float(value)


def affected_queries(num_queries: int, rate: float, key) -> np.ndarray:
    """The sorted indices of ``max(1, round(rate * num_queries))`` distinct query rows."""
    n = max(1, int(round(rate * num_queries)))
    return np.sort(np.asarray(jax.random.choice(key, num_queries, (n,), replace=False)))


def renamed(rows, prefix: str):
    """``rows`` with one example per row, named ``<prefix>:<original id>`` (a copy must not
    share its id with the example it copies; ``#<row>`` is added where names would clash)."""
    tokens = hasattr(rows, "example_keys")  # token rows: a query example may span rows
    old = [rows.example_keys[e] for e in rows.example_id_N] if tokens else list(rows.ids_N)
    names = [f"{prefix}:{k}" for k in old]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    if tokens:
        return dataclasses.replace(
            rows, example_id_N=np.arange(len(rows)), example_keys=tuple(names)
        )
    return dataclasses.replace(rows, ids_N=np.asarray(names, dtype=object))


def inject(task, query, affected_A, amount: float, key):
    """``(train, exact_A, perturbed_A)``: the task's training rows followed by an exact copy
    of each affected query row, then a perturbed copy of each (``task.perturbed`` with
    ``amount``), and the example indices of both copies of each affected query."""
    leaked = query.subset(affected_A)
    exact = renamed(leaked, "copy")
    perturbed = renamed(task.perturbed(leaked, key, amount), "perturbed")
    e, a = task.num_examples, len(affected_A)
    train = task.train.concat(exact).concat(perturbed)
    return train, e + np.arange(a), e + a + np.arange(a)


def copy_ranks(scores_QxE, queries_A, copies_A) -> tuple[np.ndarray, np.ndarray]:
    """``(top_A, bottom_A)``: each copy's 1-based rank in its query's scores from the top
    (examples scoring at least the copy's score) and from the bottom (at most its score)."""
    s_AxE = np.asarray(scores_QxE)[np.asarray(queries_A)]
    own_A = s_AxE[np.arange(len(s_AxE)), np.asarray(copies_A)][:, None]
    return (s_AxE >= own_A).sum(1), (s_AxE <= own_A).sum(1)


def recall(top_A, bottom_A, ks, prefix: str = "") -> dict:
    """Recall of the copies in the top-k, bottom-k and their union, and their median and
    mean rank from the top; keys ``<prefix>recall_at_<k>`` etc."""
    out = {}
    for k in ks:
        top, bottom = top_A <= k, bottom_A <= k
        out[f"{prefix}recall_at_{k}"] = float(top.mean())
        out[f"{prefix}bottom_recall_at_{k}"] = float(bottom.mean())
        out[f"{prefix}union_recall_at_{k}"] = float((top | bottom).mean())
    out[f"{prefix}median_rank"] = float(np.median(top_A))
    out[f"{prefix}mean_rank"] = float(np.mean(top_A))
    return out


def method_report(scores_QxE, affected_A, exact_A, perturbed_A, ks) -> dict:
    """Recall of the exact and perturbed copies (``recall``), and how often a method scores
    the exact copy exactly 0 (a tie with every other zero)."""
    scores_QxE = np.asarray(scores_QxE)
    out = recall(*copy_ranks(scores_QxE, affected_A, exact_A), ks)
    out.update(recall(*copy_ranks(scores_QxE, affected_A, perturbed_A), ks, "perturbed_"))
    out["copy_score_zero_frac"] = float((scores_QxE[affected_A, exact_A] == 0).mean())
    return out


def memorisation(task, query, affected_A) -> dict:
    """Mean ``task.row_metrics`` (loss; a classifier's ``correct``, as accuracy) of the task's
    model on the affected and the unaffected query rows (None where a group is empty)."""
    rows = task.row_metrics(query)
    hit = np.zeros(len(query), bool)
    hit[affected_A] = True
    out = {}
    for group, mask in (("affected", hit), ("unaffected", ~hit)):
        out[group] = {
            ("accuracy" if m == "correct" else m): float(v[mask].mean()) if mask.any() else None
            for m, v in rows.items()
        }
    return out


def digest(rate: float, amount: float, seed: int) -> str:
    """Eight hex digits naming a contaminated run's directory."""
    text = json.dumps({"rate": rate, "amount": amount, "seed": seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run(config, workdir: str) -> dict:
    """The contamination audit of a run config; writes and returns ``contamination.json``."""
    clean_config = config.copy_and_resolve_references()  # each run fills in its own auto T
    dirty_config = config.copy_and_resolve_references()
    cc = config.apps.contamination
    rate = apps_config.fraction(cc.rate, "contamination.rate")
    amount = perturbation(config)
    splits, names = apps_run.load_checked(clean_config, workdir)
    e0 = apps_run.num_examples(splits.train)
    ks = apps_config.counts(cc.ks, "contamination.ks", e0, "the training examples")
    ctx = apps_run.open_run(clean_config, workdir, splits=splits)
    key_pick, key_noise = jax.random.split(jax.random.key(cc.seed))
    affected_A = affected_queries(len(splits.query), rate, key_pick)
    train, exact_A, perturbed_A = inject(ctx.task, splits.query, affected_A, amount, key_noise)
    sub = os.path.join(workdir, f"contamination-{digest(rate, amount, cc.seed)}")
    logging.info(
        "contamination: %d of %d queries leaked (exact + perturbed copies): %d -> %d training "
        "examples; the contaminated model and scores in %s",
        len(affected_A),
        len(splits.query),
        e0,
        e0 + 2 * len(affected_A),
        sub,
    )
    dirty = apps_run.open_run(dirty_config, sub, splits=dataclasses.replace(splits, train=train))
    e = dirty.task.num_examples
    progress, out = Progress("contamination: attribution", len(names), "methods"), {}
    for i, name in enumerate(names):
        scores_QxE = apps_run.scores(dirty, [name])[name]
        out[name] = method_report(scores_QxE, affected_A, exact_A, perturbed_A, ks)
        progress.update(i + 1)
    expect = {}
    for k in ks:
        expect.update({f"{w}recall_at_{k}": k / e for w in ("", "bottom_")})
        expect[f"union_recall_at_{k}"] = 2 * k / e
    results = {
        "settings": {"rate": rate, "perturbation": amount, "ks": list(ks), "seed": cc.seed},
        "num_train_examples": e0,
        "num_train_examples_contaminated": e,
        "affected_queries": affected_A.tolist(),
        "workdir": sub,
        "random_expectation": expect,
        "memorisation": {
            "contaminated_model": memorisation(dirty.task, splits.query, affected_A),
            "base_model": memorisation(ctx.task, splits.query, affected_A),
        },
        "methods": out,
    }
    apps_run.save(workdir, "contamination", results)
    return results


def format_table(results: dict) -> str:
    """Two rows per method (its exact copies, then its perturbed copies): recall in the top-k,
    bottom-k and their union, median and mean rank from the top; then the random expectation
    and the memorisation check."""
    ks = results["settings"]["ks"]
    kinds = ("recall", "bottom_recall", "union_recall")
    head = ["method"] + [f"{w}@{k}" for w in ("top", "bottom", "union") for k in ks]
    rows = [head + ["median rank", "mean rank"]]
    for name, r in results["methods"].items():
        for p, label in (("", name), ("perturbed_", f"{name} (perturbed)")):
            cells = [f"{r[f'{p}{kind}_at_{k}']:.3f}" for kind in kinds for k in ks]
            rows.append([label, *cells, f"{r[f'{p}median_rank']:.0f}", f"{r[f'{p}mean_rank']:.1f}"])
    ex = results["random_expectation"]
    chance = [f"{ex[f'{kind}_at_{k}']:.3f}" for kind in kinds for k in ks]
    rows.append(["chance (k/E)", *chance, "-", "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"{len(results['affected_queries'])} leaked queries; E = "
        f"{results['num_train_examples']} + copies = {results['num_train_examples_contaminated']}"
    )
    for model, groups in results["memorisation"].items():
        parts = [
            f"{g}: " + ", ".join(f"{m} {v:.4f}" for m, v in vals.items() if v is not None)
            for g, vals in groups.items()
            if any(v is not None for v in vals.values())
        ]
        lines.append(f"{model}: " + "; ".join(parts))
    return "\n".join(lines)
