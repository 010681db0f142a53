"""The LDS benchmark job, for every task kind: data -> task -> base model -> ground truth ->
attribution methods -> LDS (with bootstrap CIs), paired deltas vs STRIDE, ablations, the noise
ceiling -> ``results.json``, ``lds.png`` and ``table.md``.

What differs by kind (loading data, the base model, the retrains) is in ``job.models``;
everything else is one code path. Every stage caches its output in the workdir beside a copy
of the config slice that made it; a restart reuses what matches and recomputes what does not
(changing a later stage's setting keeps the earlier stages). Stage-1 training resumes from
its orbax checkpoint. All randomness is keyed by config seeds, so a killed job restarted
gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import logging

from stride_jax import checkpoint, distributed, methods, profiling, sharding
from stride_jax.apps import explain
from stride_jax.eval import metrics, report
from stride_jax.job import cache, models
from stride_jax.job.config import method_block, validate
from stride_jax.methods import datamodel
from stride_jax.stride import method as stride_method

ABLATIONS = {
    "no_fidelity": lambda c: c.stage1.update(w_fidelity=0.0),
    "no_stability": lambda c: c.stage1.update(w_stability=0.0),
    "no_linearity": lambda c: c.stage1.update(w_linearity=0.0),
    "bernoulli_design": lambda c: c.design.update(kind="bernoulli"),
}


@dataclasses.dataclass
class Context:
    """One run's config, workdir, data splits, device mesh, and the base model as a task."""

    config: object
    workdir: str
    splits: object
    mesh: object
    task: object = None
    base_stats: dict = None
    base_slice: dict = None  # the config slice of the base model (data, model, recipe)


def method_dir(config, workdir: str, label: str) -> str:
    """Where a method keeps its working files: ``workdir/<name>``, or
    ``workdir/variants/<label>`` for a ``config.variants`` entry."""
    if label in config.variants:
        return os.path.join(workdir, "variants", label)
    return os.path.join(workdir, label)


def context(config, workdir: str):
    """Validate, load data, then the base model and ground truth (reused when cached).
    Returns ``(ctx, gt)``; bad config or data fail before the workdir is created."""
    ctx = prepare(config, workdir)
    return ctx, models.ground_truth(config, ctx.task, ctx.splits, workdir)


def prepare(config, workdir: str, splits=None) -> Context:
    """Validate, load data (or take ``splits``), then the base model (reused when cached):
    the run's ``Context`` without ground truth (what the applications start from)."""
    validate(config)
    notes = models.resolve(config)
    splits = models.load_data(config, workdir) if splits is None else splits
    notes += models.plan(config, splits)
    for line in notes:
        logging.info("auto: %s", line)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(*distributed.mesh_axes(config.mesh.data, config.mesh.ops))
    ctx = Context(config, workdir, splits, mesh)
    ctx.task, ctx.base_stats, ctx.base_slice = models.base_task(config, splits, mesh, workdir)
    return ctx


def run_method(ctx: Context, name: str, cfg, workdir: str | None = None, query=None):
    """Fit and score one registered method on ``query`` rows (default: the queries); returns
    (scores over training EXAMPLES, float32; timing / memory metadata)."""
    method = methods.get(name, ctx.config.task)
    task = dataclasses.replace(ctx.task, workdir=workdir)
    query = ctx.splits.query if query is None else query
    with profiling.PeakMemory() as mem:
        t0 = time.time()
        state = profiling.block_all(method.fit(task, cfg))  # async dispatch: time the work
        t1 = time.time()
        rows = methods.as_scores(method.score(task, state, query, cfg))
        t2 = time.time()
    scores = np.asarray(task.sum_to_examples(rows), np.float32)
    return scores, {"seconds_split": {"fit": t1 - t0, "score": t2 - t1}, "peak_mb": mem.peak_mb}


def evaluate(scores_QxN, gt, n_boot: int) -> dict:
    """LDS (Spearman, with CI), Pearson and Kendall variants, score statistics."""
    res = metrics.lds(scores_QxN, gt["masks_MxN"], gt["losses_MxQ"], n_boot=n_boot)
    out = {
        "lds": res["lds"],
        "lds_ci95": list(res["ci95"]),
        "num_valid_queries": res["num_valid"],
        "per_query": res["per_query"],
    }
    for kind in ("pearson", "kendall"):
        out[f"lds_{kind}"] = metrics.lds(
            scores_QxN, gt["masks_MxN"], gt["losses_MxQ"], kind=kind, n_boot=n_boot
        )["lds"]
    out["score_stats"] = metrics.score_stats(scores_QxN)
    return out


def method_scores(ctx: Context, label: str, method: str, cfg, sub_dir: str):
    """``(scores_QxE, meta)`` of one method on the run's queries: reused from
    ``scores_<label>.npy`` when made with the same method config and base model."""

    def compute():
        logging.info("%s: scoring %s", label, _sizes(ctx))
        return run_method(ctx, method, cfg, sub_dir)

    # A method's outputs depend on its own config and on the base model (data, model, recipe):
    # its stage directory is dropped when the base model's slice changed.
    cache.guarded(os.path.dirname(sub_dir), os.path.basename(sub_dir), ctx.base_slice)
    key = {"method": cfg.to_dict(), "base": ctx.base_slice}
    return cache.scores(ctx.workdir, label, compute, key)


def scored(ctx: Context, label: str, method: str, cfg, sub_dir: str, gt) -> dict:
    """Run (or reuse, if made with the same config) one method's scores and evaluate them."""
    scores, meta = method_scores(ctx, label, method, cfg, sub_dir)
    result = {**evaluate(scores, gt, ctx.config.lds.n_boot), **meta}
    lo, hi = result["lds_ci95"]
    logging.info(
        "%s: LDS %.4f [%.4f, %.4f] in %.1fs", label, result["lds"], lo, hi, result["seconds"]
    )
    return result


def _design(ctx: Context, cfg) -> dict:
    """A STRIDE row's design size: T subsets over N training rows, and the degree d."""
    n = len(ctx.splits.train)
    t = stride_method.resolve_num_subsets(cfg.design, n, ctx.config.task)
    return {"num_subsets": t, "num_train_rows": n, "degree": cfg.design.degree}


def _sizes(ctx: Context) -> str:
    """ "Q query rows x N training rows", with the example counts where rows are chunks."""
    q, n = len(ctx.splits.query), len(ctx.splits.train)
    e = ctx.task.num_examples
    if e == n:
        return f"{q} queries x {n} training examples"
    return f"{q} query rows x {n} training rows ({e} training examples)"


def noise_ceiling(ctx: Context, gt) -> dict:
    """LDS of a second set of retrains (same subsets, other seeds) used as the prediction.

    With ``groundtruth.seeds = S > 1`` (decoders) both sets average S training seeds per
    subset: ``lds`` is the S-seed ceiling, and ``single_seed`` the agreement of one seed's
    retrains with one other seed's (the ceiling a one-seed ground truth would have)."""
    c = ctx.config
    other = models.ceiling_losses(c, ctx.task, ctx.splits, ctx.workdir, gt)
    res = datamodel.retrain_agreement(other["losses_MxQ"], gt["losses_MxQ"], n_boot=c.lds.n_boot)
    out = {"lds": res["lds"], "lds_ci95": list(res["ci95"]), "seeds": _seeds(c)}
    logging.info(
        "noise ceiling (%d seed(s)): LDS %.4f [%.4f, %.4f]", out["seeds"], res["lds"], *res["ci95"]
    )
    if out["seeds"] > 1:
        one = datamodel.retrain_agreement(
            other["losses_by_seed_SxMxQ"][0], gt["losses_by_seed_SxMxQ"][0], n_boot=c.lds.n_boot
        )
        out["single_seed"] = {"lds": one["lds"], "lds_ci95": list(one["ci95"])}
        logging.info("noise ceiling (1 seed): LDS %.4f [%.4f, %.4f]", one["lds"], *one["ci95"])
    return out


def _seeds(config) -> int:
    """Training seeds per ground-truth subset (1 for classifiers)."""
    return config.groundtruth.seeds if config.task == "decoder" else 1


def run(config, workdir: str) -> dict:
    """The whole job; returns and writes ``workdir/results.json`` (and the report)."""
    ctx, gt = context(config, workdir)
    entries = {}
    for label in config.methods:
        name, cfg = method_block(config, label)
        entries[label] = scored(ctx, label, name, cfg, method_dir(config, workdir, label), gt)
        if label in config.variants:
            entries[label]["variant_of"] = name
        if name == "stride":
            entries[label]["design"] = _design(ctx, cfg)
    ablations = {}
    base_label = config.ablation_base
    for name in config.ablations:
        sub = method_block(config, base_label)[1].copy_and_resolve_references()
        with sub.unlocked():
            ABLATIONS[name](sub)
        # STRIDE's own ablations keep their earlier labels (and cached scores).
        label = name if base_label == "stride" else f"{base_label}_{name}"
        sub_dir = os.path.join(workdir, "ablations", label)
        ablations[label] = scored(ctx, f"ablation_{label}", "stride", sub, sub_dir, gt)
        ablations[label]["ablation_of"] = base_label
        ablations[label]["design"] = _design(ctx, sub)
    if base_label != "stride" and base_label in entries:  # each ablation vs its own base
        for entry in ablations.values():
            entry["delta_vs_base"] = metrics.paired_difference(
                entry["per_query"], entries[base_label]["per_query"], n_boot=config.lds.n_boot
            )
    if "stride" in entries:  # paired over the same queries: method (or ablation) minus STRIDE
        base = entries["stride"]["per_query"]
        for entry in [*entries.values(), *ablations.values()]:
            if entry is not entries["stride"]:
                entry["delta_vs_stride"] = metrics.paired_difference(
                    entry["per_query"], base, n_boot=config.lds.n_boot
                )
    for entry in [*entries.values(), *ablations.values()]:
        entry.pop("per_query")
    results = {
        "dataset": models.describe(config, ctx.splits),
        "ground_truth": {
            "num_models": config.groundtruth.num_models,
            "alpha": config.groundtruth.alpha,
            "seeds": _seeds(config),
        },
        "base_model": ctx.base_stats,
        "methods": entries,
    }
    if ablations:
        results["ablations"] = ablations
    if config.groundtruth.noise_ceiling:
        results["noise_ceiling"] = noise_ceiling(ctx, gt)
    # The resolved config (automatic values filled in) beside the results it made.
    checkpoint.save_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
    checkpoint.save_json(os.path.join(workdir, "results.json"), results)
    # The report's pages and plots are plain files: process 0 writes them (their few model
    # evaluations are local, no collectives), the others wait.
    with distributed.exclusive("report") as writer:
        if writer:
            report.write_report(results, workdir)
            explain.run_report(ctx, results)  # workdir/report: plots, query pages, index.html
    return results
