"""Where STRIDE's steering operators attach: one ``Site`` per task kind.

A site is everything STRIDE's stages need to know about the model, and nothing else:

- ``encode(rows) -> cache``: the frozen base model run once on a row set; the cache (a dict
  of arrays, leading axis = rows) holds the hidden state at the site and what the continuation
  needs (base logits, top-K logits, base losses...);
- ``stage1_inputs(cache, design, key) -> inputs``: the cache of the training rows bundled with
  the design and the linearity sketch, what ``stage1.fit_operators`` reads;
- ``operator_kwargs(cache, num_subsets)``: how ``stage1.fit_operators`` builds the untrained
  operators and the jitted training chunk for this site;
- ``responses(ops_graphdef, ops_params, cache_q, rows_q, mesh) -> y_QxT``: every operator's
  loss drop on every query row, in one fused call (the continuation from the steered state).

``ClassifierSite`` steers a classifier's logits (``operators.LogitHook``: the paper's
classifier variant) or also an MLP's last hidden layer (``operators.HiddenHook``);
``ResidualSite`` adds the operators to a decoder's residual stream after a layer
(``residual``). The Gauss-Newton stage 1 (``stage1.init="newton"``, ``newton.py``) reads
both sites' inputs through the same four members (``num_rows``, ``newton_batch``,
``newton_stats``, ``newton_sites``): a classifier's curvature is exact (its steered logits are
linear in the gates), the residual stream's is the base model's sampled (true) Fisher through
the upper blocks (``residual.LMInputs.newton_stats``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.errors import ConfigError
from stride_jax.stride import classifier_inputs, newton, precision, residual, responses
from stride_jax.stride.operators import (
    HiddenHook,
    LogitHook,
    SteeringOperators,
    with_compute_dtype,
)

HOOKS = ("logits", "hidden", "kernels")  # a classifier's; a decoder's: DECODER_HOOKS
DECODER_HOOKS = ("residual", "kernels")


@dataclasses.dataclass(frozen=True)
class Site:
    """One task's attachment site for the ``stride`` config ``cfg`` (the protocol above)."""

    task: object
    cfg: object

    def encode(self, rows) -> dict:
        raise NotImplementedError

    def stage1_inputs(self, cache, design, key):
        raise NotImplementedError

    def operator_kwargs(self, cache, num_subsets: int) -> dict:
        raise NotImplementedError

    def responses(self, ops_graphdef, ops_params, cache_q, rows_q, mesh):
        raise NotImplementedError

    def fit_operators(self, cache, design, keys, mesh, workdir):
        """Stage 1 on the training rows' ``cache``: (ops graphdef, ops params, history).
        ``keys[0]`` / ``keys[1]``: the sketch and stage-1 keys (``method._Keys``: split on
        first use). The default builds ``stage1_inputs`` and runs
        ``stage1.fit_operators`` (Gauss-Newton and / or Adam, resumable from ``workdir``)."""
        from stride_jax.stride import stage1

        inputs = self.stage1_inputs(cache, design, keys[0])
        kwargs = self.operator_kwargs(cache, design.num_subsets)
        return stage1.fit_operators(inputs, self.cfg.stage1, keys[1], mesh, workdir, **kwargs)

    def row_inputs(self, cache, rows):
        """Stage-1 style inputs over any rows (no design), for their gradients in the gates
        (``newton.curvature_and_gradients``; ``linear_responses``, ``opspace``)."""
        raise NotImplementedError

    def stage2_responses(self, ops_graphdef, ops_params, cache_q, rows_q, mesh):
        """y_QxT the way ``cfg.responses`` says: "forward" (the steered forward pass of every
        operator, ``responses``) or "linear" (``newton.linear_responses``: one gradient per
        query row, then a Q x P by P x T product)."""
        if check_responses(self.cfg) == "forward":
            return self.responses(ops_graphdef, ops_params, cache_q, rows_q, mesh)
        return _linear_responses_fn(ops_graphdef)(ops_params, self.row_inputs(cache_q, rows_q))


@functools.lru_cache(maxsize=8)
def _linear_responses_fn(ops_graphdef):
    """``newton.linear_responses`` jitted once per operator structure."""

    def fn(params, inputs):
        return newton.linear_responses(nnx.merge(ops_graphdef, params), inputs)

    return jax.jit(fn)


RESPONSES = ("forward", "linear")


def check_responses(cfg) -> str:
    kind = cfg.get("responses", "forward")
    if kind not in RESPONSES:
        raise ConfigError(f"stride.responses must be one of {RESPONSES}, got {kind!r}")
    return kind


@dataclasses.dataclass(frozen=True)
class ClassifierSite(Site):
    """Operators on a classifier's logits (and optionally an MLP's last hidden layer)."""

    hook: object = None

    def encode(self, rows) -> dict:
        return jax.jit(self.hook.encode)(jnp.asarray(rows.x_NxF))

    def stage1_inputs(self, cache, design, key):
        y_N = self.task.train.y_N
        return classifier_inputs.make_inputs(
            cache, y_N, design, self.cfg.stage1, key, fixed=self.hook.fixed
        )

    def row_inputs(self, cache, rows):
        return classifier_inputs.row_inputs(
            cache, rows.y_N, self.cfg.stage1.top_k, fixed=self.hook.fixed
        )

    def operator_kwargs(self, cache, num_subsets: int) -> dict:
        def make_ops(key):
            return self.hook.make_operators(key, cache, num_subsets, self.cfg.stage1)

        return {"make_ops": make_ops}

    def responses(self, ops_graphdef, ops_params, cache_q, rows_q, mesh):
        dtype = precision.compute_dtype(self.cfg)
        return responses.response_matrix(
            with_compute_dtype(ops_graphdef, ops_params, dtype),
            ops_params,
            cache_q,
            rows_q.y_N,
            mesh,
            self.cfg.response_batch,
            fixed=self.hook.fixed,
        )


def classifier_site(task, cfg) -> ClassifierSite:
    """The site ``cfg.hook`` names: "logits" (penultimate features and logits) or "hidden"
    (also the MLP's last hidden pre-activation, with a ``cfg.hidden_rank`` basis of
    ``cfg.hidden_basis``: "whitened" or "pca" principal directions of the layer's input)."""
    precision.compute_dtype(cfg)  # checked before any work
    check_responses(cfg)
    if check_basis(cfg.stage1) != "random":
        raise ConfigError(
            "stage1.basis selects the residual-stream basis of decoders; classifiers use "
            "hook='hidden' with hidden_basis for a data basis: leave stage1.basis='random'"
        )
    kind = cfg.get("hook", "logits")
    if kind == "kernels":
        from stride_jax.stride import kernels

        return kernels.kernel_site(task, cfg)
    if kind == "logits":
        return ClassifierSite(task, cfg, LogitHook(task.features, task.logits))
    if kind == "hidden":
        from stride_jax.models import mlp

        if task.model_config is None:
            raise ConfigError(
                "stride.hook='hidden' steers the last hidden layer of the library's MLP "
                "(models.mlp); this model is not one: use stride.hook='logits'"
            )
        hook = HiddenHook(
            lambda x: mlp.hidden_site(task.graphdef, task.params, x),
            mlp.head_weights(task.params),
            cfg.hidden_rank,
            cfg.get("hidden_basis", "whitened"),
        )
        return ClassifierSite(task, cfg, hook)
    raise ConfigError(f"stride.hook must be one of {HOOKS}, got {kind!r}")


def hook_layer(cfg, n_layers: int) -> int:
    """Residual stream after ``cfg.layer`` blocks (0: the embeddings; n_layers: the final
    residual, only the final norm and the head above it); ``layer < 0`` means round(2/3 of the
    depth)."""
    layer = round(2 * n_layers / 3) if cfg.layer < 0 else int(cfg.layer)
    if not 0 <= layer <= n_layers:
        raise ConfigError(f"stride layer must be in 0..{n_layers} (the model has {n_layers})")
    return layer


@dataclasses.dataclass(frozen=True)
class ResidualSite(Site):
    """Operators added to a decoder's residual stream after layer ``upper.layer``, at every
    token; the layers above run once per operator (``residual``)."""

    upper: residual.Upper = None

    def encode(self, rows) -> dict:
        c = self.cfg
        return residual.encode(
            self.task.graphdef,
            self.task.params,
            self.task.arrays(rows),
            self.upper.layer,
            c.stage1.top_k,
            c.vocab_chunk,
            c.encode_batch,
            self.task.mesh,
        )

    def stage1_inputs(self, cache, design, key):
        data = self.task.arrays(self.task.train)
        return residual.make_inputs(
            self.upper, self.task.params, cache, data, design, self.cfg.stage1, key
        )

    def row_inputs(self, cache, rows):
        return residual.row_inputs(self.upper, self.task.params, cache, self.task.arrays(rows))

    def operator_kwargs(self, cache, num_subsets: int) -> dict:
        d = self.task.model_config.d_model
        config = self.cfg.stage1
        if check_basis(config) == "random":
            return {"dims": (d, d)}
        attn = np.asarray(self.task.arrays(self.task.train)["attn"]) > 0

        def make_ops(key):
            ops = SteeringOperators.for_config(key, d, d, num_subsets, config)
            ops.w_down[...] = residual.token_basis(
                cache["h"], attn, config.rank, config.basis_scale, config.basis
            )
            return ops

        return {"make_ops": make_ops}

    def responses(self, ops_graphdef, ops_params, cache_q, rows_q, mesh):
        dtype = precision.compute_dtype(self.cfg)
        return residual.response_matrix(
            dataclasses.replace(self.upper, compute_dtype=dtype),
            self.task.params,
            with_compute_dtype(ops_graphdef, ops_params, dtype),
            ops_params,
            cache_q,
            self.task.arrays(rows_q),
            self.cfg,
            mesh,
        )


BASES = ("random", "pca", "whitened")


def check_basis(config) -> str:
    """``stage1.basis``: "random" (a random projection, learned when ``lr_muon > 0``) or a
    frozen data basis of the hooked residual's top principal directions ("pca": their own
    spread; "whitened": unit spread), decoders only; configs without the key mean random."""
    basis = config.get("basis", "random")
    if basis not in BASES:
        raise ConfigError(f"stage1.basis must be one of {BASES}, got {basis!r}")
    return basis


# The Gauss-Newton solve holds a P x P matrix of the P = d_model * rank gate parameters of one
# operator (and factors it): above this P it is refused rather than left to run out of memory.
MAX_NEWTON_PARAMS = 16384


def decoder_site(task, cfg) -> Site:
    """The decoder's site ``cfg.hook`` names: "residual" (``residual_site``) or "kernels"
    (``kernels.kernel_site``: operators on the MLPs' dense kernels)."""
    precision.compute_dtype(cfg)  # checked before any work, and before the task is read
    hook = cfg.get("hook", "residual")
    if hook not in DECODER_HOOKS:
        raise ConfigError(f"stride.hook must be one of {DECODER_HOOKS} for a decoder, got {hook!r}")
    if hook == "kernels":
        from stride_jax.stride import kernels

        return kernels.kernel_site(task, cfg)
    return residual_site(task, cfg)


def residual_site(task, cfg) -> ResidualSite:
    precision.compute_dtype(cfg)  # checked before any work, and before the task is read
    check_responses(cfg)
    if check_basis(cfg.stage1) != "random" and cfg.stage1.lr_muon > 0:
        raise ConfigError(
            f"stage1.basis={cfg.stage1.basis!r} is a frozen data basis: set stage1.lr_muon=0"
        )
    if cfg.stage1.probe_mask_members:
        raise ConfigError("stage1.probe_mask_members is not supported for language models")
    if newton.check_init(cfg.stage1) == "newton":
        d = task.model_config.d_model
        p = d * cfg.stage1.rank
        if p > MAX_NEWTON_PARAMS:
            raise ConfigError(
                f"stage1.init='newton' on a d_model={d} residual with stage1.rank="
                f"{cfg.stage1.rank} solves a {p} x {p} curvature ({4 * p * p / 2**30:.1f} GiB): "
                f"set stage1.rank <= {MAX_NEWTON_PARAMS // d}"
            )
    layer = hook_layer(cfg, task.model_config.n_layers)
    upper = residual.Upper(task.graphdef, layer, cfg.vocab_chunk, remat=cfg.get("remat", False))
    return ResidualSite(task, cfg, upper)
