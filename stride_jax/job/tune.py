"""One tuner for any method on any task kind, on validation queries (never the reported ones).

The grid is the product of ``--sweep`` axes over keys of the method's own config block
(``config.stride`` or ``config.baselines.<method>``), e.g. ``stage1.w_linearity=0,1,10`` and
``lasso.lam_frac=0.02,0.05``. Where the validation queries come from depends on the kind:

- classifier: the validation split replaces the queries (``data.query_split='val'``), and the
  job's base model and ground truth are built for them in the workdir (the workdir is then a
  tuning workdir, not a reporting one);
- decoder: the ground-truth retrains of the job already scored the validation rows
  (``data.n_val > 0``), so tuning shares the job's workdir and costs no retraining.

Writes ``workdir/tuning_<method>.json`` (one row per grid point) and returns its rows.
"""

from __future__ import annotations

import itertools
import os

from stride_jax import checkpoint
from stride_jax.errors import ConfigError
from stride_jax.job import benchmark, cli
from stride_jax.job.config import method_block, validate


def validation_ground_truth(config, workdir: str):
    """``(ctx, query_rows, gt)``: the context, the validation rows to score and their ground
    truth (masks and the retrained models' losses on those rows)."""
    if config.task == "classifier":
        config.data.query_split = "val"
        benchmark.run(config, workdir)  # base model + ground truth on validation queries
        ctx, gt = benchmark.context(config, workdir)
        return ctx, ctx.splits.query, gt
    if config.data.n_val is not None and not config.data.n_val > 0:
        raise ConfigError("tuning needs validation rows: set data.n_val > 0 (or leave it unset)")
    ctx, gt = benchmark.context(config, workdir)
    if ctx.splits.val is None or "losses_val_MxV" not in gt:
        raise ConfigError("the cached ground truth has no validation rows; use a new --workdir")
    return ctx, ctx.splits.val, {"masks_MxN": gt["masks_MxN"], "losses_MxQ": gt["losses_val_MxV"]}


def tune(config, workdir: str, method: str, sweep: list[str]) -> list[dict]:
    """Score every grid point of ``sweep`` for ``method`` on validation queries (see the
    module doc); prints one LDS line per point."""
    # Everything that can be wrong with the request fails before the retrains. Only the tuned
    # method runs: the config's own method list (and ablations) play no part.
    config.methods, config.ablations = (), ()
    validate(config)
    label = method
    method, base_cfg = method_block(config, label)  # a method or a config.variants label
    axes = cli.parse_sweep(sweep)
    for key, values in axes:
        cli.set_path(base_cfg.copy_and_resolve_references(), key, values[0])
    ctx, query, gt = validation_ground_truth(config, workdir)
    rows = []
    for values in itertools.product(*(v for _, v in axes)):
        sub = base_cfg.copy_and_resolve_references()
        for (key, _), value in zip(axes, values, strict=True):
            cli.set_path(sub, key, value)
        name = "_".join(f"{k}={v}" for (k, _), v in zip(axes, values, strict=True)) or "default"
        sweep_dir = cli.sweep_dir(workdir, label, name, sub)
        scores, meta = benchmark.run_method(ctx, method, sub, sweep_dir, query)
        res = benchmark.evaluate(scores, gt, config.lds.n_boot)
        point = dict(zip((k for k, _ in axes), values, strict=True))
        rows.append({"point": point, "lds": res["lds"], "lds_ci95": res["lds_ci95"], **meta})
        lo, hi = res["lds_ci95"]
        print(f"{name}: LDS {res['lds']:.4f} [{lo:.3f}, {hi:.3f}]", flush=True)
    checkpoint.save_json(os.path.join(workdir, f"tuning_{label}.json"), rows)
    return rows
