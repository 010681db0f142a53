"""The public entry point: scores of any registered method for any task.

task = stride_jax.tasks.classifier(model, train=(x, y), queries=(xq, yq), retrain=...)
scores_QxE = stride_jax.attribute(task, method="stride")
stride_jax.evaluate.lds(task, scores_QxE, num_models=50)
"""

from __future__ import annotations

import time

import ml_collections
import numpy as np
from absl import logging

from stride_jax import logs, methods
from stride_jax.errors import ConfigError
from stride_jax.task import Task

STRIDE_CONFIG_DOC = """\
A STRIDE config (``method_config(task, "stride")`` prints the values for the task's kind):

- ``seed``: the key of the linearity sketch, stage 1's sampling and the Lasso.
- ``design``: which training examples each of the T steering operators stands for.
  ``kind`` "expander" (every example in exactly ``degree`` subsets, sizes within one of
  each other), "interleaved" (the same, without the expander's blocks of rows that meet
  every subset once: full rank at T >= N), "auto" (the decoder default: interleaved at
  T >= N, the expander below) or "bernoulli" (random membership); ``num_subsets`` T, the
  number of operators (0, the default: automatic, classifier min(3000, N * degree // 2),
  decoder min(8192, N); see ``stride.defaults.auto_num_subsets``; a T set by hand must
  leave no subset empty);
  ``degree`` d; ``seed``.
- ``hook``: where the operators attach. Classifiers: "logits" (the default), "hidden" (also
  the MLP's last hidden layer, with a ``hidden_rank`` basis of ``hidden_basis`` "whitened"
  or "pca" directions of its input) or "kernels". Decoders: "kernels" (the default) or
  "residual" (added to the residual stream after block ``layer``; -1: round(2/3 of the
  depth)).
- ``kernels`` (hook "kernels": operators on the dense kernels, closed-form Gauss-Newton
  step with Kronecker-factored curvature): ``layers`` (a decoder's last blocks steered, 0:
  all that fit in memory), ``params_filter`` (a substring of the steered kernels' paths),
  ``rank`` (each operator reads the top-r principal directions of a kernel's input; 0: all),
  ``fisher`` "true" (labels from the model) or "empirical" (the data's; the decoder
  default), ``curvature`` "ekfac" (eigenvalue-corrected, the default) or "kfac" (one pass
  over the training rows fewer).
- ``stage1``: training the T operators on the frozen model, in six groups.
  Operators: ``rank`` (basis width), ``basis_scale`` (init scale), ``init`` "zero" (Adam from
  zero gates) or "newton" (one damped Gauss-Newton step; classifiers only, then ``steps``
  may be 0). Schedule: ``steps``, ``warmup_steps``, ``log_every`` (steps per jitted chunk
  and progress line), ``ckpt_every``. Optimizer: ``lr`` (AdamW on the gates), ``lr_muon``
  (Muon on the basis; 0 freezes it), ``lr_end_frac`` (linear decay to this fraction),
  ``weight_decay``. Batches: ``subsets_per_step`` (operators trained per step, 0 = all),
  ``fidelity_rows`` "all" or "sample" (``fidelity_batch`` member rows), ``stability_rows``
  "shared" or "per_subset" (``stability_batch`` non-member rows), ``probe_batch`` (rows of the
  linearity probe), ``top_k`` (classes or tokens the KL keeps). Linearity: ``sketch``
  "features" or "gaussian" with ``sketch_dim`` columns, ``ridge``, ``intercept``,
  ``probe_mask_members``, ``linearity_over_all`` (test all T operators, not the step's).
  Weights of the losses: ``w_fidelity`` (lower the members' loss), ``w_stability`` (KL to the
  base model on non-members), ``w_linearity`` (loss drops additive over examples), ``gate_l2``.
- ``lasso``: recovering per-example scores from the T responses of each query:
  ``lam_frac`` (lambda as a fraction of the query's lambda_max), ``path_len`` (warm-started
  path points), ``maxiter`` (FISTA steps per point), ``tol``, ``nonneg``, ``fit_intercept``,
  ``select`` ("fixed" or "heldout", with ``holdout_frac`` and ``path_min_frac``).
- ``lasso_compressed``: Lasso settings that replace ``lasso``'s when the design has fewer
  subsets than examples (T < N); the decoder default selects harder there (lam_frac 1e-3 on a
  6-point path) than at T >= N (lam_frac 3e-5), where the Lasso only re-estimates influence.
- ``recovery``: "lasso" (the batched Lasso above), "kernel" (the training rows' own
  responses decode each query's: ``stride_jax.stride.posterior``; one more responses pass
  over the training rows in the fit, N x T floats kept, dense scores), "solve" (T >= N only:
  the least-squares solve of A b = y, the design's N x N normal equations factored once in
  float64; dense scores) or "auto" (the default: for closed-form operators,
  ``stage1.init="newton"`` with ``steps=0``, the kernel recovery when T < N and, with
  linear responses, the exact solve when T >= N; the Lasso otherwise. On validation at
  T = N/2: 0.364 against the Lasso's 0.313 on Shakespeare, 0.498 against 0.463 on SFT,
  0.719 against 0.711 on MNIST-5k; at N/4 0.316 / 0.441 / 0.716 against 0.233 / 0.378 /
  0.678; at T = N on Shakespeare the exact solve 0.3947 against the Lasso's 0.3931).
  ``recovery_jitter``: the ridge added to the subsets' mean responses, relative to their
  mean diagonal.
- ``size_weighted`` (classifiers): scale each subset's response by its size before the Lasso.
- Batch sizes (memory, not results): ``response_batch`` (classifiers: query rows per fused
  response call); decoders: ``encode_batch`` (rows per encoding call), ``op_chunk``
  (operators per response call), ``query_batch`` (query rows per call), ``vocab_chunk``
  (vocabulary columns per logit chunk).

Every other method's defaults: ``stride_jax.methods.default_configs(kind)`` (one block per
method) or ``method_config(task, name)``."""


def method_config(task: Task, method: str, config=None) -> ml_collections.ConfigDict:
    """``method``'s defaults for ``task``'s kind, with ``config`` (a dict or ConfigDict, nested
    like the defaults) applied on top; a key the defaults lack is refused by name (a
    ``ConfigError``). Print it to see every setting of a method; the blocks of the STRIDE
    config are described below.

    {stride}
    """
    cfg = methods.get(method, task.kind).default_config(task.kind)
    if config is None:
        return cfg
    overrides = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    _apply(cfg, dict(overrides), method)
    return cfg


def _apply(cfg, overrides: dict, where: str) -> None:
    for key, value in overrides.items():
        if key not in cfg:
            raise ConfigError(f"unknown {where} config key {key!r}; known: {sorted(cfg.keys())}")
        if isinstance(cfg[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _apply(cfg[key], value, f"{where}.{key}")
        else:
            cfg[key] = value


def attribute(
    task: Task, method: str = "stride", config=None, *, queries=None, verbose=None
) -> np.ndarray:
    """Scores (queries x training examples, float32; higher = the example helps, i.e. lowers
    the query's loss) of ``method`` on ``task``'s query rows (or ``queries``, rows of the same
    kind). A chunked decoder example's rows are summed into one column per example.

    ``method``: a name in ``stride_jax.methods.names(task.kind)``. ``config``: a dict (or
    ConfigDict) of overrides of the method's defaults for the task kind, nested like them, e.g.
    ``{"design": {"num_subsets": 500}, "lasso": {"lam_frac": 0.01}}``; an unknown key is a
    ``ConfigError`` naming it (``method_config(task, method)`` shows the full config).
    ``verbose``: this package's progress lines (INFO, on stderr) during the call: True, False,
    a level name ("debug", "info", "warning") or None (the default), which follows
    ``stride_jax.set_verbosity`` and is on before any call to it. The logging state is
    restored afterwards.

    {stride}
    """
    if not isinstance(task, Task):
        raise TypeError(
            f"task must be a stride_jax.task.Task (build one with stride_jax.tasks.classifier "
            f"or stride_jax.tasks.decoder), got {type(task).__name__}"
        )
    m = methods.get(method, task.kind)
    cfg = method_config(task, method, config)
    queries = task.query if queries is None else queries
    if queries is None or len(queries) == 0:
        raise ValueError("attribute needs at least one query row")
    with logs.verbosity(verbose):
        t0 = time.time()
        logging.info(
            "attribute: %s on %d query rows x %d training rows (%s task)",
            method,
            len(queries),
            len(task.train),
            task.kind,
        )
        state = m.fit(task, cfg)
        rows = methods.as_scores(m.score(task, state, queries, cfg))
        scores = task.sum_to_examples(rows).astype(np.float32)
        logging.info(
            "attribute: %s done in %.1fs; scores %d queries x %d training examples",
            method,
            time.time() - t0,
            *scores.shape,
        )
    return scores


def _with_stride_doc(fn) -> None:
    """Put the STRIDE config description where ``fn``'s docstring says ``{stride}``."""
    if fn.__doc__:  # None under python -OO
        fn.__doc__ = fn.__doc__.replace("{stride}", STRIDE_CONFIG_DOC.replace("\n", "\n    "))


_with_stride_doc(method_config)
_with_stride_doc(attribute)
