"""STRIDE as a registered method, once for every task kind (through ``task.site``).

``fit(task, cfg)``: the design over the training rows, the base model encoded once at the
site, stage 1 (Gauss-Newton and / or Adam, resumable from ``task.workdir``).
``score(task, fitted, query_rows, cfg)``: all T responses per query row in one fused call,
then the batched Lasso (or, with ``stride.recovery="kernel"``, the decoder of ``posterior``
built in the fit from the training rows' own responses; with "solve", at T >= N, the least-
squares solve of the design factored in the fit); scores are per training row
(``task.sum_to_examples`` adds chunks up).
``attribute_rows`` returns the diagnostics too (responses, lambdas, active-set sizes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import logging

from stride_jax import checkpoint, distributed, sharding
from stride_jax.errors import ConfigError
from stride_jax.stride import defaults, posterior, recover, subsets


@dataclasses.dataclass
class Scores:
    """``scores_QxN`` (higher = the row lowers the query's loss), with diagnostics: the
    responses, each query's Lasso lambda and active-set size (with the kernel recovery or the
    exact solve: 0 and N, their scores are dense)."""

    scores_QxN: np.ndarray
    responses_QxT: np.ndarray
    lam_Q: np.ndarray
    nnz_Q: np.ndarray
    design: subsets.Design
    history: list
    seconds: dict


@dataclasses.dataclass
class Fitted:
    """Stage-1 output: the site, the design and the trained operators (query-independent)."""

    site: object
    design: subsets.Design
    graphdef: object
    params: object
    history: list
    seconds: dict
    # (query rows object, y_QxT) of the last ``score``: a Lasso sweep reuses the responses.
    last_responses: tuple = ()
    # ``stride.recovery="kernel"``: the training rows' responses and their factor; "solve": the
    # design's normal equations, factored (``posterior``)
    decoder: posterior.Decoder | posterior.Solve | None = None


def design_for(dc, n: int, kind: str = "classifier") -> subsets.Design:
    """The design of ``stride.design`` over n training rows (``num_subsets=0``: the automatic
    T of ``defaults.auto_num_subsets``); an infeasible T is refused (``check_design``)."""
    if n < 1:
        raise ValueError("need at least one training example")
    t = resolve_num_subsets(dc, n, kind)
    design = subsets.make_design(jax.random.key(dc.seed), design_kind(dc, t, n), t, n, dc.degree)
    sizes = design.sizes_T
    logging.info(
        "stride: %s design, T=%d subsets, d=%d, subset sizes %d..%d",
        design.kind,
        design.num_subsets,
        dc.degree,
        sizes.min(),
        sizes.max(),
    )
    return design


def design_kind(dc, t: int, n: int) -> str:
    """``stride.design.kind``; "auto" (the decoder default) is "interleaved" at T >= N, where
    the expander's blocks would leave A rank-deficient for the exact solve (``posterior``),
    and "expander" at T < N, where the two layouts tie on validation (experiments/RESULTS.md,
    session 13)."""
    if dc.kind != "auto":
        return dc.kind
    chosen = "interleaved" if t >= n else "expander"
    logging.info("auto: stride.design.kind: auto -> %r (T = %d, N = %d)", chosen, t, n)
    return chosen


def resolve_num_subsets(dc, n: int, kind: str) -> int:
    """T for ``stride.design`` over n training rows: ``num_subsets``, or the automatic rule
    when it is 0; raises ``ConfigError`` (before any work) when T cannot be filled."""
    t = int(dc.num_subsets) or defaults.auto_num_subsets(n, dc.degree, kind)
    check_design(dc, t, n, kind)
    return t


def check_design(dc, t: int, n: int, kind: str = "classifier") -> None:
    """Refuse a design that would leave subsets empty or cannot place d distinct subsets."""
    where = "stride.design.num_subsets"
    if dc.degree < 1:
        raise ConfigError(f"stride.design.degree must be >= 1, got {dc.degree}")
    if dc.degree > t:
        raise ConfigError(
            f"stride.design.degree={dc.degree} exceeds the {t} subsets ({where}); lower degree"
        )
    if dc.kind == "expander" and n * dc.degree < t:
        raise ConfigError(
            f"{where}={t} is more than the {n} training rows x degree {dc.degree} = "
            f"{n * dc.degree} can fill ({t - n * dc.degree} subsets would be empty): set it "
            f"to at most {n * dc.degree}, or to 0 for the automatic "
            f"T={defaults.auto_num_subsets(n, dc.degree, kind)}"
        )


def lasso_targets(y_QxT: np.ndarray, design: subsets.Design, config) -> np.ndarray:
    """What the Lasso fits: the responses, times each subset's size with
    ``config.size_weighted`` (the fidelity loss averages over S_k's members, so operator k
    responds to ``sum_{i in S_k} b_i / |S_k|``; scaled, the rows fit ``A b`` exactly)."""
    if not config.get("size_weighted", False):
        return y_QxT
    return y_QxT * np.asarray(design.sizes_T, y_QxT.dtype)[None]


def lasso_config(cfg, compressed: bool) -> recover.LassoConfig:
    """``cfg.lasso``, with ``cfg.lasso_compressed``'s settings over it when the design is
    compressive (T < N): a Lasso tuned at T = N (nearly unregularised, where it only
    re-estimates per-example influence) is not the one that recovers from fewer subsets than
    examples (decoder defaults, experiments/RESULTS.md)."""
    lasso = cfg.lasso.to_dict()
    over = dict(cfg.get("lasso_compressed", {}))
    unknown = sorted(set(over) - set(lasso))
    if unknown:
        raise ConfigError(f"stride.lasso_compressed: unknown Lasso settings {unknown}")
    if compressed:
        lasso |= over
    return recover.LassoConfig(**lasso)


class _Keys:
    """``stride.seed``'s three keys (sketch, stage 1, Lasso), split on first use: the kernel
    operators and the exact solve use none, and a fresh process then compiles no split."""

    def __init__(self, seed: int):
        self._seed, self._keys = int(seed), None

    def __getitem__(self, i):
        if self._keys is None:
            self._keys = jax.random.split(jax.random.key(self._seed), 3)
        return self._keys[i]

    def __iter__(self):
        return (self[i] for i in range(3))


def _keys(cfg) -> _Keys:
    return _Keys(cfg.seed)


def _stage1_slice(cfg) -> dict:
    """The settings stage 1 reads: all of ``config.stride`` but the Lasso's."""
    return {k: v for k, v in cfg.to_dict().items() if k != "lasso"}


# Stage 1 does not depend on ``lasso``: a tuning sweep over Lasso settings in one process
# reuses the trained operators (one fit kept, keyed by everything else it depends on).
_FITS: dict = {}


def fit(task, cfg, *, reuse: bool = True) -> Fitted:
    """Design + stage 1 for ``task``; with ``reuse``, the last fit of this process is returned
    when params, rows and every setting but ``lasso`` are the same (Lasso sweeps)."""
    if not reuse:
        return _fit(task, cfg)
    stage1_cfg = json.dumps(_stage1_slice(cfg))
    hit = _FITS.get("entry")
    # The entry holds the task's params and rows, so ``is`` cannot match a new object.
    if hit and hit[0] == stage1_cfg and hit[1] is task.params and hit[2] is task.train:
        return hit[3]
    fitted = _fit(task, cfg)
    _FITS["entry"] = (stage1_cfg, task.params, task.train, fitted)
    return fitted


_SOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stride-solve")


def _timed_factor(design):
    t0 = time.time()
    return posterior.solve_factor(design), time.time() - t0


def _fit(task, cfg) -> Fitted:
    site = task.site(cfg)
    mesh = task.mesh if task.mesh is not None else sharding.make_mesh()
    workdir = os.path.join(task.workdir, "stride") if task.workdir else None
    design = design_for(cfg.design, len(task.train), task.kind)
    if workdir:  # stage 1 reads everything but the Lasso; a stale checkpoint is dropped
        stage1_slice = _stage1_slice(cfg) | {"rows": [len(task.train), design.num_subsets]}
        changed = checkpoint.claim(workdir, stage1_slice)  # N and the resolved T too
        if changed:
            logging.warning("stride: config changed (%s); retraining stage 1", ", ".join(changed))
    recovery, jitter = posterior.resolve(cfg, design), posterior.jitter(cfg)
    # The exact solve's factor depends on the design alone: it is computed on the host in a
    # thread while stage 1 compiles and runs (scipy releases the GIL), and joined after.
    solving = _SOLVER.submit(_timed_factor, design) if recovery == "solve" else None
    t0 = time.time()
    try:
        cache = site.encode(task.train)
        graphdef, params, history = site.fit_operators(cache, design, _keys(cfg), mesh, workdir)
    finally:
        factor = solving.result() if solving is not None else None  # raises what it raised
    fitted = Fitted(site, design, graphdef, params, history, {"stage1": time.time() - t0})
    if factor is not None:
        fitted.decoder, fitted.seconds["solve_factor"] = factor
        logging.info(
            "stride: exact solve: the design's %d x %d normal equations factored in %.2fs "
            "(beside stage 1)",
            design.num_examples,
            design.num_examples,
            fitted.seconds["solve_factor"],
        )
    if recovery == "kernel":
        t0 = time.time()
        logging.info(
            "stride: kernel recovery: responses of the %d training rows to the %d operators",
            design.num_examples,
            design.num_subsets,
        )
        r = site.stage2_responses(graphdef, params, cache, task.train, mesh)
        r_NxT = np.asarray(distributed.to_host(r), np.float32)
        fitted.decoder = posterior.factor(design, r_NxT, jitter)
        fitted.seconds["train_responses"] = time.time() - t0
        logging.info(
            "stride: kernel recovery: the %d training rows' responses to %d operators and "
            "their factor in %.2fs",
            design.num_examples,
            design.num_subsets,
            fitted.seconds["train_responses"],
        )
    return fitted


def responses(fitted: Fitted, query, mesh) -> np.ndarray:
    """y_QxT (float32 numpy): every operator's loss drop on every query row."""
    if fitted.last_responses and fitted.last_responses[0] is query:
        return fitted.last_responses[1]
    site = fitted.site
    y = site.stage2_responses(fitted.graphdef, fitted.params, site.encode(query), query, mesh)
    y_QxT = np.asarray(distributed.to_host(y), np.float32)
    fitted.last_responses = (query, y_QxT)
    return y_QxT


def attribute_rows(task, fitted: Fitted, query, cfg) -> Scores:
    """Stage 2 on the query rows ``query``: responses, then the batched Lasso."""
    mesh = task.mesh if task.mesh is not None else sharding.make_mesh()
    if len(query) < 1:
        raise ValueError("need at least one query")
    seconds = dict(fitted.seconds)
    t0 = time.time()
    y_QxT = responses(fitted, query, mesh)
    seconds["responses"] = time.time() - t0
    logging.info(
        "stride: responses %s in %.2fs (mean %.4g, std %.4g)",
        y_QxT.shape,
        seconds["responses"],
        y_QxT.mean(),
        y_QxT.std(),
    )
    t0 = time.time()
    if fitted.decoder is not None:
        scores = posterior.decode(fitted.decoder, y_QxT)
        seconds["recovery"] = time.time() - t0
        how = "exact solve" if isinstance(fitted.decoder, posterior.Solve) else "kernel recovery"
        logging.info("stride: %s of %d queries in %.2fs", how, len(y_QxT), seconds["recovery"])
        fitted.seconds.update(responses=seconds["responses"], recovery=seconds["recovery"])
        n = fitted.design.num_examples
        lam_Q, nnz_Q = np.zeros(len(y_QxT), np.float32), np.full(len(y_QxT), n)
        return Scores(scores, y_QxT, lam_Q, nnz_Q, fitted.design, fitted.history, seconds)
    out = recover.lasso_scores(
        fitted.design,
        lasso_targets(y_QxT, fitted.design, cfg),
        lasso_config(cfg, fitted.design.num_subsets < fitted.design.num_examples),
        key=_keys(cfg)[2],
        mesh=mesh,
    )
    scores = np.asarray(distributed.to_host(out["scores_QxN"]), np.float32)
    seconds["lasso"] = time.time() - t0
    nnz = distributed.to_host(out["nnz_Q"])
    logging.info(
        "stride: Lasso in %.2fs; active set p50 %d of %d",
        seconds["lasso"],
        np.median(nnz),
        fitted.design.num_examples,
    )
    fitted.seconds.update(responses=seconds["responses"], lasso=seconds["lasso"])
    return Scores(
        scores,
        y_QxT,
        distributed.to_host(out["lam_Q"]),
        nnz,
        fitted.design,
        fitted.history,
        seconds,
    )


def score(task, fitted: Fitted, query, cfg) -> np.ndarray:
    return attribute_rows(task, fitted, query, cfg).scores_QxN


def register() -> None:
    from stride_jax import methods

    methods.register("stride", fit, score, default_config=defaults.default)


register()
