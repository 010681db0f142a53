"""Constructors of the two task kinds, each checking its parts before any work."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stride_jax.data import DataError, Dataset, make_splits
from stride_jax.task import TaskError
from stride_jax.tasks.classifier_task import ClassifierTask, default_features, default_logits


def _split_model(model, params):
    """(graphdef, params) of an NNX module or a (graphdef, params) pair; ``params`` (optional)
    replaces the module's own, and must have the same paths, shapes and dtypes."""
    if isinstance(model, nnx.Module):
        graphdef, own = nnx.split(model, nnx.Param)
    elif isinstance(model, tuple) and len(model) == 2:
        graphdef, own = model
    else:
        raise TaskError(
            f"model must be a flax.nnx.Module or a (graphdef, params) pair, got {type(model)}"
        )
    if params is None:
        return graphdef, own
    want = {jax.tree_util.keystr(p): (v.shape, v.dtype) for p, v in _leaves(own)}
    got = {jax.tree_util.keystr(p): (v.shape, v.dtype) for p, v in _leaves(params)}
    for path in sorted(set(want) | set(got)):
        if path not in got:
            raise TaskError(f"params do not match the model: parameter {path} is missing")
        if path not in want:
            raise TaskError(f"params do not match the model: unexpected parameter {path}")
        if want[path][0] != got[path][0]:
            raise TaskError(
                f"params do not match the model: {path} has shape {got[path][0]}, "
                f"the model's is {want[path][0]}"
            )
    return graphdef, params


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    )[0]


def _as_dataset(what: str, data) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if isinstance(data, Dataset):
        return data.x_NxF, data.y_N, data.ids_N
    if isinstance(data, tuple) and len(data) in (2, 3):
        return (*data, None) if len(data) == 2 else data
    raise TaskError(f"{what} must be an (x, y) pair or a stride_jax.data.Dataset, got {type(data)}")


def classifier(
    model,
    *,
    train,
    queries,
    params=None,
    retrain=None,
    logits_fn=None,
    features_fn=None,
    num_classes: int | None = None,
    mesh=None,
    workdir: str | None = None,
    seed: int = 0,
) -> ClassifierTask:
    """A ``ClassifierTask`` for a trained NNX module ``model`` (or a ``(graphdef, params)``
    pair) on ``train = (x_NxF, y_N)`` and ``queries = (x_QxF, y_Q)`` (or ``Dataset``s).

    ``logits_fn(graphdef, params, x_BxF)`` defaults to calling the module; ``features_fn``
    (penultimate features, where STRIDE's logit-site basis reads) to its ``features`` method,
    or the logits. ``retrain(key, x_NxF, y_N, weight_N) -> params`` is the model's recipe
    (``adamw_recipe`` builds one); methods that retrain refuse a task without it. Refuses, with
    one line naming it: data that ``data.make_splits`` refuses (wrong shapes, NaN, labels, a
    query feature size unlike the training one), params that do not match the model, and
    logits that are not (batch, num_classes).
    """
    graphdef, params = _split_model(model, params)
    x, y, ids = _as_dataset("train", train)
    xq, yq, _ = _as_dataset("queries", queries)
    try:
        splits = make_splits("user", x, y, xq, yq, ids_train=ids)
    except DataError as e:
        raise TaskError(str(e)) from e
    c = max(splits.num_classes, int(num_classes or 0))
    task = _classifier_task(
        graphdef,
        params,
        splits,
        mesh,
        workdir,
        seed,
        num_classes=c,
        logits_fn=logits_fn or default_logits,
        features_fn=features_fn or default_features,
        retrain_fn=retrain,
    )
    probe = jnp.asarray(splits.train.x_NxF[:2])
    try:
        logits = jax.eval_shape(lambda p, xb: task.logits_fn(graphdef, p, xb), params, probe)
    except Exception as e:  # noqa: BLE001 - any failure here is the model not fitting the data
        raise TaskError(
            f"the model cannot be applied to a batch of the training features "
            f"{tuple(probe.shape)}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    if logits.shape != (probe.shape[0], c) and not (
        num_classes is None and _wider(logits, probe, c)
    ):
        raise TaskError(
            f"the model's logits have shape {tuple(logits.shape)} for a batch of "
            f"{probe.shape[0]}; expected ({probe.shape[0]}, {c}) (one column per class)"
        )
    task.num_classes = int(logits.shape[-1])
    return task


def _classifier_task(graphdef, params, splits, mesh, workdir, seed, **fields) -> ClassifierTask:
    return ClassifierTask(
        graphdef=graphdef,
        params=params,
        train=splits.train,
        query=splits.query,
        mesh=mesh,
        workdir=workdir,
        seed=seed,
        **fields,
    )


def _wider(logits, probe, c: int) -> bool:
    """Logits of (batch, C') with C' above the C labels seen (classes absent from train)."""
    return logits.ndim == 2 and logits.shape[0] == probe.shape[0] and logits.shape[1] > c


def adamw_recipe(init_fn, steps: int = 150, lr: float = 3e-3, weight_decay: float = 1e-2):
    """A ``retrain`` recipe for ``classifier``: full-batch AdamW with cosine decay from a new
    model ``init_fn(key) -> nnx.Module``, minimising the weighted mean cross-entropy (the
    library MLP's recipe, for any module). Returns ``retrain(key, x, y, weight_N) -> params``,
    jitted."""
    from stride_jax.models.mlp import cross_entropy

    def fit(key, x_NxF, y_N, weight_N):
        graphdef, params = nnx.split(init_fn(key), nnx.Param)
        tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
        denom = jnp.maximum(weight_N.sum(), 1.0)

        def loss_fn(p):
            return (cross_entropy(nnx.merge(graphdef, p)(x_NxF), y_N) * weight_N).sum() / denom

        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return params

    return jax.jit(fit)


def mlp_task(model_config, graphdef, params, splits, *, mesh=None, workdir=None) -> ClassifierTask:
    """The library's MLP (``models.mlp``) with its recipe ``model_config`` on ``splits``."""
    from stride_jax.models import mlp

    fit = mlp.jitted_fit(model_config, splits.num_classes)
    return _classifier_task(
        graphdef,
        params,
        splits,
        mesh,
        workdir,
        model_config.seed,
        num_classes=splits.num_classes,
        logits_fn=mlp.apply,
        features_fn=mlp.apply_features,
        retrain_fn=fit,
        model_config=model_config,
    )


def decoder(
    model,
    *,
    train,
    queries,
    params=None,
    recipe=None,
    params0=None,
    tokenizer=None,
    mesh=None,
    workdir: str | None = None,
    seed: int = 0,
):
    """A ``DecoderTask`` for a ``models.transformer.Decoder`` (module or ``(graphdef,
    params)``) on token rows ``train`` / ``queries`` (``data.TokenBlocks``).

    ``recipe`` (an ``lm_train`` config: steps, batch, lr, ...) and ``params0`` (where it
    starts: the pre-trained weights for SFT, a fresh init for pre-training) make ``retrain``;
    without them methods that retrain refuse the task. Refuses rows whose token ids exceed the
    vocabulary or whose length exceeds the model's ``max_len``, and params that do not match.
    """
    from stride_jax.data import TokenBlocks
    from stride_jax.tasks.decoder_task import DecoderTask

    graphdef, params = _split_model(model, params)
    cfg = nnx.merge(graphdef, params).cfg
    for what, rows in (("train", train), ("queries", queries)):
        if not isinstance(rows, TokenBlocks):
            raise TaskError(f"{what} must be a stride_jax.data.TokenBlocks, got {type(rows)}")
        if rows.block_len > cfg.max_len:
            raise TaskError(
                f"{what} rows have {rows.block_len} tokens; the model's max_len is {cfg.max_len}"
            )
        if len(rows) and int(rows.tokens_NxL.max()) >= cfg.vocab_size:
            raise TaskError(
                f"{what} has token id {int(rows.tokens_NxL.max())} but the model's vocabulary "
                f"has {cfg.vocab_size} ids: tokenizer and model do not match"
            )
    if params0 is not None:
        _split_model((graphdef, params), params0)
    return DecoderTask(
        graphdef=graphdef,
        params=params,
        train=train,
        query=queries,
        mesh=mesh,
        workdir=workdir,
        seed=seed,
        model_config=cfg,
        recipe=recipe,
        params0=params0,
        tokenizer=tokenizer,
    )
