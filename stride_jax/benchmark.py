"""The LDS benchmark job: base model, ground truth, attribution methods, LDS, results.json.

Every stage caches its output in the workdir beside a copy of the config slice that made it;
a restart reuses what matches and refuses what does not (a different config needs a new
workdir). Stage-1 training resumes from its orbax checkpoint. All randomness is keyed by
config seeds, so a killed job restarted gives the same results.json numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from stride_jax import baselines, checkpoint, groundtruth, metrics, profiling, sharding
from stride_jax.apps import report
from stride_jax.baselines import datamodel
from stride_jax.config import validate
from stride_jax.data import load
from stride_jax.models import mlp

ABLATIONS = {
    "no_fidelity": lambda c: c.stage1.update(w_fidelity=0.0),
    "no_stability": lambda c: c.stage1.update(w_stability=0.0),
    "no_linearity": lambda c: c.stage1.update(w_linearity=0.0),
    "bernoulli_design": lambda c: c.design.update(kind="bernoulli"),
}


@dataclasses.dataclass
class Context:
    config: object
    workdir: str
    splits: object
    mesh: object
    graphdef: object = None
    params: object = None
    base_stats: dict = None


def _guarded(workdir: str, name: str, config_slice: dict) -> str:
    """Path of a cached stage output; refuses a cache built from another config."""
    path = os.path.join(workdir, name)
    checkpoint.guard_config(path, config_slice)
    return path


def base_model(ctx: Context):
    """Train (or reload) the base model with the shared recipe; logs its query accuracy."""
    c, s = ctx.config, ctx.splits
    in_dim = s.train.x_NxF.shape[1]
    graphdef, abstract = mlp.abstract(c.model, in_dim, s.num_classes)
    path = _guarded(
        ctx.workdir, "base_model.npz", {"data": c.data.to_dict(), "model": c.model.to_dict()}
    )
    if os.path.exists(path):
        params = checkpoint.load_params(path, abstract)
        logging.info("base model: reusing %s", path)
    else:
        t0 = time.time()
        x, y = jnp.asarray(s.train.x_NxF), jnp.asarray(s.train.y_N)
        fit = mlp.jitted_fit(c.model, s.num_classes)
        params = fit(jax.random.key(c.model.seed), x, y, jnp.ones(len(s.train)))
        checkpoint.save_params(path, params)
        logging.info("base model: trained in %.1fs", time.time() - t0)
    stats = {}
    for split, ds in (("train", s.train), ("query", s.query)):
        logits = mlp.apply(graphdef, params, jnp.asarray(ds.x_NxF))
        stats[f"{split}_loss"] = float(mlp.cross_entropy(logits, ds.y_N).mean())
        stats[f"{split}_accuracy"] = float((logits.argmax(-1) == ds.y_N).mean())
    logging.info(
        "base model: train loss %.4f acc %.4f | query loss %.4f acc %.4f",
        stats["train_loss"],
        stats["train_accuracy"],
        stats["query_loss"],
        stats["query_accuracy"],
    )
    ctx.graphdef, ctx.params = graphdef, params
    return stats


def method_config(config, name: str):
    """A method's own config block: ``config.stride`` or ``config.baselines.<name>``."""
    return config.stride if name == "stride" else config.baselines[name]


def task(ctx: Context, workdir: str | None = None) -> baselines.Task:
    """The frozen base model and training data, as every method's ``fit``/``score`` sees them."""
    return baselines.Task(
        model_config=ctx.config.model,
        graphdef=ctx.graphdef,
        params=ctx.params,
        train=ctx.splits.train,
        num_classes=ctx.splits.num_classes,
        mesh=ctx.mesh,
        workdir=workdir,
        seed=ctx.config.model.seed,
    )


def run_method(ctx: Context, name: str, cfg, workdir: str | None = None):
    """Fit and score one registered method; returns (scores_QxN, timing/memory metadata)."""
    method, tk = baselines.get(name), task(ctx, workdir)
    with profiling.PeakMemory() as mem:
        t0 = time.time()
        state = profiling.block_all(method.fit(tk, cfg))  # async dispatch: time the work
        t1 = time.time()
        scores = baselines.as_scores(method.score(tk, state, ctx.splits.query, cfg))
        t2 = time.time()
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


def _method(ctx, name, fn, gt, config_slice: dict):
    """Run (or reuse) one method's scores and evaluate them. Cached scores are tied to the
    method's config (``config_slice``): another config in the same workdir is refused. The
    config is recorded when the scores are saved, so a run killed before that leaves no claim."""
    path = os.path.join(ctx.workdir, f"scores_{name}.npy")
    meta_path = os.path.join(ctx.workdir, f"scores_{name}.meta.json")
    if os.path.exists(path) and os.path.exists(meta_path):
        checkpoint.guard_config(path, config_slice)
        scores = np.load(path)
        with open(meta_path) as f:
            meta = json.load(f)
        logging.info("%s: reusing %s", name, path)
    else:
        logging.info(
            "%s: scoring %d queries x %d training examples",
            name,
            len(ctx.splits.query),
            len(ctx.splits.train),
        )
        t0 = time.time()
        scores, meta = fn()
        meta["seconds"] = time.time() - t0
        checkpoint.save_npy(path, scores)
        checkpoint.record_config(path, config_slice)
        checkpoint.save_json(meta_path, meta)
    result = {**evaluate(scores, gt, ctx.config.lds.n_boot), **meta}
    logging.info(
        "%s: LDS %.4f [%.4f, %.4f] in %.1fs",
        name,
        result["lds"],
        *result["lds_ci95"],
        result["seconds"],
    )
    return result


def context(config, workdir: str):
    """Validate, load data, then the base model and ground truth (reused when cached)."""
    validate(config)
    splits = load(config.data)  # fails on bad data before any work or any file is written
    os.makedirs(workdir, exist_ok=True)
    logging.info(
        "data: %s, %d train, %d query, %d classes",
        splits.name,
        len(splits.train),
        len(splits.query),
        splits.num_classes,
    )
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.ops)
    ctx = Context(config, workdir, splits, mesh)
    ctx.base_stats = base_model(ctx)
    _guarded(
        workdir,
        "groundtruth.npz",
        {
            "data": config.data.to_dict(),
            "model": config.model.to_dict(),
            "groundtruth": _gt_slice(config),
        },
    )
    gt = groundtruth.build(config.groundtruth, config.model, splits, mesh, workdir)
    return ctx, gt


def _gt_slice(config) -> dict:
    """The ground-truth settings that change its numbers (not batching or the ceiling)."""
    gt = config.groundtruth
    return {"num_models": gt.num_models, "alpha": gt.alpha, "seed": gt.seed}


def noise_ceiling(ctx: Context, gt) -> dict:
    """LDS of a second set of retrains (same subsets, other seeds) used as the prediction."""
    config = ctx.config
    path = _guarded(
        ctx.workdir,
        "noise_ceiling.npz",
        {
            "data": config.data.to_dict(),
            "model": config.model.to_dict(),
            "groundtruth": _gt_slice(config),
            "ceiling_seed": config.groundtruth.ceiling_seed,
        },
    )
    if os.path.exists(path):
        losses = checkpoint.load_arrays(path)["losses_MxQ"]
    else:
        logging.info(
            "noise ceiling: retraining the %d ground-truth subsets with other seeds",
            config.groundtruth.num_models,
        )
        losses = datamodel.noise_ceiling(
            config.model,
            ctx.splits,
            gt["masks_MxN"],
            jax.random.key(config.groundtruth.ceiling_seed),
            ctx.mesh,
            config.groundtruth.models_per_batch,
        )
        checkpoint.save_arrays(path, losses_MxQ=losses)
    res = datamodel.retrain_agreement(losses, gt["losses_MxQ"], n_boot=config.lds.n_boot)
    logging.info("noise ceiling: LDS %.4f [%.4f, %.4f]", res["lds"], *res["ci95"])
    return {"lds": res["lds"], "lds_ci95": list(res["ci95"])}


def run(config, workdir: str) -> dict:
    """The whole job; returns and writes ``workdir/results.json``."""
    ctx, gt = context(config, workdir)
    splits = ctx.splits
    checkpoint.save_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
    methods = {}
    for name in config.methods:
        cfg, sub_dir = method_config(config, name), os.path.join(workdir, name)
        methods[name] = _method(
            ctx, name, lambda n=name, c=cfg, d=sub_dir: run_method(ctx, n, c, d), gt, cfg.to_dict()
        )
    if "stride" in methods:  # paired over the same queries: method minus STRIDE
        for name, entry in methods.items():
            if name != "stride":
                entry["delta_vs_stride"] = metrics.paired_difference(
                    entry["per_query"], methods["stride"]["per_query"], n_boot=config.lds.n_boot
                )
    ablations = {}
    for name in config.ablations:
        sub = config.stride.copy_and_resolve_references()
        with sub.unlocked():
            ABLATIONS[name](sub)
        sub_dir = os.path.join(workdir, "ablations", name)
        ablations[name] = _method(
            ctx,
            f"ablation_{name}",
            lambda s=sub, d=sub_dir: run_method(ctx, "stride", s, d),
            gt,
            sub.to_dict(),
        )
        if "stride" in methods:  # paired over the same queries: is the full method better?
            ablations[name]["delta_vs_stride"] = metrics.paired_difference(
                ablations[name]["per_query"],
                methods["stride"]["per_query"],
                n_boot=config.lds.n_boot,
            )
    for entry in [*methods.values(), *ablations.values()]:
        entry.pop("per_query")
    results = {
        "dataset": {
            "name": splits.name,
            "n_train": len(splits.train),
            "n_query": len(splits.query),
        },
        "ground_truth": {
            "num_models": config.groundtruth.num_models,
            "alpha": config.groundtruth.alpha,
        },
        "base_model": ctx.base_stats,
        "methods": methods,
    }
    if ablations:
        results["ablations"] = ablations
    if config.groundtruth.noise_ceiling:
        results["noise_ceiling"] = noise_ceiling(ctx, gt)
    checkpoint.save_json(os.path.join(workdir, "results.json"), results)
    report.write_report(results, workdir)
    return results


def only_stride_jax_info(record) -> bool:
    """Log filter: keep warnings from everywhere, INFO only from this package's progress."""
    return record.levelno > 20 or "stride_jax" in record.pathname


def _delta(d) -> str:
    if d is None:
        return ""
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def format_table(results: dict) -> str:
    rows = [("method", "LDS", "95% CI", "Pearson", "Kendall", "seconds", "vs stride (paired CI)")]
    entries = list(results["methods"].items())
    entries += [
        (f"stride w/o {k}" if k.startswith("no_") else f"stride {k}", v)
        for k, v in results.get("ablations", {}).items()
    ]
    for name, r in entries:
        rows.append(
            (
                name.replace("w/o no_", "w/o "),
                f"{r['lds']:.4f}",
                f"[{r['lds_ci95'][0]:.3f}, {r['lds_ci95'][1]:.3f}]",
                f"{r['lds_pearson']:.4f}",
                f"{r['lds_kendall']:.4f}",
                f"{r['seconds']:.1f}",
                _delta(r.get("delta_vs_stride")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
