"""Stage 1: learn the T steering operators on a frozen base model.

Each step takes K subsets (``subsets_per_step``; 0 = all T); for each, its members
(``fidelity_rows``: all of them, or a sampled batch), non-members (``stability_rows``: one
batch shared by the K operators, or a batch per subset) and a shared batch of probe examples
(linearity), plus an L2 penalty ``gate_l2`` on the K gates. Steps run in
jitted ``lax.scan`` chunks (``log_every`` steps per call) with explicit shardings: operator
gates are sharded over the mesh's ``ops`` axis. The key of step s is ``fold_in(key, s)``, so
a run resumed from a checkpoint takes exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from stride_jax import checkpoint, sharding
from stride_jax.errors import ConfigError
from stride_jax.stride import losses, newton
from stride_jax.stride.operators import SteeringOperators


def make_optimizer(config) -> optax.GradientTransformation:
    """MuonAdamW: muon on the 2-D basis ``w_down``, AdamW on the per-subset gates.

    Both follow linear warmup then linear decay to ``lr_end_frac`` of the peak;
    ``lr_muon = 0`` freezes the basis.
    """

    def schedule(peak):
        warm = max(config.warmup_steps, 1)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, warm),
                optax.linear_schedule(peak, peak * config.lr_end_frac, max(config.steps - warm, 1)),
            ],
            [warm],
        )

    # lr_muon = 0 keeps the basis at its random init (random features).
    muon = optax.contrib.muon(schedule(config.lr_muon)) if config.lr_muon else optax.set_to_zero()
    adamw = optax.adamw(schedule(config.lr), weight_decay=config.weight_decay)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "muon" if "w_down" in jax.tree_util.keystr(path) else "adamw", params
        )

    return optax.multi_transform({"muon": muon, "adamw": adamw}, labels)


def membership(inputs, rows_KxB: jax.Array, subset_ids_K: jax.Array) -> jax.Array:
    """float32 K x B: 1 where example rows_KxB[k, b] is a member of subset subset_ids_K[k]."""
    return (inputs.subsets_NxD[rows_KxB] == subset_ids_K[:, None, None]).any(-1).astype(jnp.float32)


def all_subsets(config, num_subsets: int) -> bool:
    """True when every step trains all T operators (``subsets_per_step`` 0 or T)."""
    return config.subsets_per_step in (0, num_subsets)


def sample_batch(key, inputs, config):
    """Subset ids (K,), member rows (K, Bf), their weights, non-member rows (K, Bs), their
    weights, probe rows (P,).

    ``fidelity_rows="all"``: each subset's full member list (Bf = the largest subset, padding
    weighted 0); "sample": ``fidelity_batch`` draws from the members. ``stability_rows=
    "shared"``: one draw of ``stability_batch`` rows broadcast to all K subsets (each subset's
    own members weighted 0); "per_subset": an independent draw per subset.
    """
    t = inputs.members_TxS.shape[0]
    n = inputs.subsets_NxD.shape[0]
    k_sub, k_mem, k_non, k_probe = jax.random.split(key, 4)
    if all_subsets(config, t):
        ids_K = jnp.arange(t)
    else:
        ids_K = jax.random.choice(k_sub, t, (config.subsets_per_step,), replace=False)
    num = ids_K.shape[0]
    members = inputs.members_TxS[ids_K]
    if config.fidelity_rows == "all":
        mem_KxB = members
    else:
        sizes = (members < n).sum(-1)
        u = jax.random.uniform(k_mem, (num, config.fidelity_batch))
        pos = jnp.minimum((u * sizes[:, None]).astype(jnp.int32), members.shape[1] - 1)
        mem_KxB = jnp.take_along_axis(members, pos, axis=1)
    w_fid = (mem_KxB < n).astype(jnp.float32)
    if config.stability_rows == "shared":
        non_B = jax.random.randint(k_non, (config.stability_batch,), 0, n)
        non_KxB = jnp.broadcast_to(non_B, (num, config.stability_batch))
    else:
        non_KxB = jax.random.randint(k_non, (num, config.stability_batch), 0, n)
    w_stab = 1.0 - membership(inputs, non_KxB, ids_K)
    probe_P = jax.random.randint(k_probe, (config.probe_batch,), 0, n)
    return ids_K, jnp.minimum(mem_KxB, n - 1), w_fid, non_KxB, w_stab, probe_P


def gate_penalty(ops, ids_K, config) -> jax.Array:
    """Mean over the step's operators of ||B_k||^2 / 2 (the damping of each operator's fit)."""
    ids = None if all_subsets(config, ops.num_subsets) else ids_K
    return 0.5 * ops.gate_sq_norms(ids).mean()


def loss_terms(ops, inputs, batch, config):
    """The three losses and the gate penalty (scalars) for one sampled batch, on any site's
    inputs (``classifier_inputs.ClassifierInputs``, ``residual.LMInputs``)."""
    ids_K, mem_KxB, w_fid, non_KxB, w_stab, probe_P = batch
    ids = None if all_subsets(config, inputs.members_TxS.shape[0]) else ids_K
    fid = losses.weighted_mean(inputs.steered_losses(ops, mem_KxB, ids, False), w_fid).mean()
    shared = config.stability_rows == "shared"  # one row set: its basis is computed once
    rows = non_KxB[0] if shared else non_KxB
    stab = losses.weighted_mean(inputs.steered_kl(ops, rows, ids, shared), w_stab).mean()
    terms = {"fidelity": fid, "stability": stab, "gate_l2": gate_penalty(ops, ids_K, config)}
    if config.w_linearity == 0:
        return terms | {"linearity": jnp.zeros(())}
    # Linearity over the batch's K subsets, or over all T operators (a far stronger test of
    # additivity: T rows against the M sketch columns, instead of K).
    lin_ids = None if config.linearity_over_all else ids_K
    drops_KxP = inputs.base_losses(probe_P) - inputs.steered_losses(ops, probe_P, lin_ids, True)
    sketch_KxM = inputs.sketch_TxM if lin_ids is None else inputs.sketch_TxM[lin_ids]
    if config.intercept:
        sketch_KxM = jnp.concatenate([sketch_KxM, jnp.ones((sketch_KxM.shape[0], 1))], axis=1)
    w_KxP = None
    if config.probe_mask_members:
        rows_K = jnp.arange(sketch_KxM.shape[0]) if lin_ids is None else lin_ids
        w_KxP = 1.0 - membership(
            inputs, jnp.broadcast_to(probe_P, (rows_K.shape[0], probe_P.shape[0])), rows_K
        )
    return terms | {"linearity": losses.linearity(drops_KxP, sketch_KxM, config.ridge, w_KxP)}


def total_loss(terms, config):
    return (
        config.w_fidelity * terms["fidelity"]
        + config.w_stability * terms["stability"]
        + config.w_linearity * terms["linearity"]
        + config.gate_l2 * terms["gate_l2"]
    )


def init_state(ops, tx):
    """(graphdef, train state) for freshly built operators ``ops``."""
    graphdef, params = nnx.split(ops, nnx.Param)
    return graphdef, {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}


def default_operators(inputs, config, dims=None):
    """``make_ops(key)`` building the classifier's logit-site operators (or, with ``dims`` =
    (feature dim, output dim), operators of those sizes)."""
    feat_dim, out_dim = dims or (inputs.h_NxD.shape[1], inputs.logits_NxC.shape[1])
    num_subsets = inputs.members_TxS.shape[0]

    def make_ops(key):
        return SteeringOperators.for_config(key, feat_dim, out_dim, num_subsets, config)

    return make_ops


def build_train_chunk(graphdef, tx, inputs, config, mesh, state_shardings):
    """Jitted function running ``config.log_every`` steps; returns (state, mean loss terms).
    ``inputs`` (any site's) travel as an argument, not a constant. With a frozen basis the
    basis features of all training rows are computed once per call (``with_frozen_basis``).

    The state argument is donated: the returned state reuses its buffers (params and both
    optimizer moments are updated in place), so a caller must not read the state it passed in
    (``state = chunk(state, key)[0]``)."""

    def one_step(state, key, inputs):
        step_key = jax.random.fold_in(key, state["step"])
        batch = sample_batch(step_key, inputs, config)

        def objective(params):
            terms = loss_terms(nnx.merge(graphdef, params), inputs, batch, config)
            return total_loss(terms, config), terms

        (_, terms), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, terms

    def chunk(state, key, inputs):
        if config.lr_muon == 0:
            inputs = inputs.with_frozen_basis(nnx.merge(graphdef, state["params"]))
        state, terms = jax.lax.scan(
            lambda s, _: one_step(s, key, inputs), state, None, config.log_every
        )
        return state, jax.tree_util.tree_map(jnp.mean, terms)

    rep = sharding.replicated(mesh)
    in_shardings = (state_shardings, rep, rep)
    jitted = jax.jit(
        chunk, in_shardings=in_shardings, out_shardings=(state_shardings, rep), donate_argnums=0
    )
    inputs = sharding.put(inputs, rep)  # once: e.g. a decoder's cache arrives split over rows

    def run(state, key):
        state, key = sharding.put((state, key), in_shardings[:2])
        with _donation_unsupported_is_fine():
            return jitted(state, key, inputs)

    return run


@contextlib.contextmanager
def _donation_unsupported_is_fine():
    """Backends that cannot donate (some CPU builds) ignore ``donate_argnums`` and warn at
    each compile; the state is then copied as before, which is fine: silence that warning
    here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        yield


def state_shardings(state, mesh, num_subsets: int):
    """Gates (and their optimizer moments: the 3-D arrays with a leading T axis) shard that
    axis over ``ops``; the rest is replicated (``sharding.operator_specs``)."""
    return sharding.named(mesh, sharding.operator_specs(state, num_subsets))


def check_config(config, num_subsets: int) -> None:
    """Refuse stage-1 settings that cannot work with T = ``num_subsets`` operators."""
    if not 0 <= config.subsets_per_step <= num_subsets:
        raise ConfigError(
            f"stage1.subsets_per_step={config.subsets_per_step} must be in 0..T (0 = all); "
            f"it exceeds T={num_subsets}"
        )
    per_step = config.subsets_per_step or num_subsets
    # The sketch serves the linearity loss of the Adam steps only (none: the Gauss-Newton
    # step alone, e.g. the decoder default, whose automatic T = N may be tiny).
    if config.steps > 0 and config.sketch_dim >= per_step:
        where = "stage1.subsets_per_step" if config.subsets_per_step else "the T subsets"
        raise ConfigError(
            f"stage1.sketch_dim={config.sketch_dim} must be smaller than {where} ({per_step})"
        )
    for key, allowed in (("fidelity_rows", ("all", "sample")), ("stability_rows", _STAB_ROWS)):
        if config[key] not in allowed:
            raise ConfigError(f"stage1.{key} must be one of {allowed}, got {config[key]!r}")
    if config.gate_l2 < 0 or config.lr_muon < 0:
        raise ConfigError("stage1.gate_l2 and stage1.lr_muon must be >= 0")
    if not config.basis_scale > 0:
        raise ConfigError(f"stage1.basis_scale must be > 0, got {config.basis_scale}")


_STAB_ROWS = ("shared", "per_subset")


def initial_operators(inputs, config, key, *, dims=None, make_ops=None):
    """The untrained operators stage 1 starts from under ``key`` (``make_ops`` or
    ``default_operators``, built from the first half of ``key``'s split): ``fit_operators``
    and ``opspace`` share them, basis included."""
    make_ops = make_ops or default_operators(inputs, config, dims)
    return make_ops(jax.random.split(key)[0])


def fit_operators(
    inputs,
    config,
    key,
    mesh,
    workdir: str | None = None,
    *,
    dims=None,
    make_ops=None,
):
    """Train the operators (resuming from ``workdir/stage1_ckpt`` if present).

    ``make_ops(key)`` builds the untrained operators (default: ``default_operators``, of
    ``dims`` = (feature dim, output dim) or the classifier's sizes from ``inputs``; a hook's
    ``make_operators`` for other sites).
    Returns (graphdef, params, history) where history lists per-chunk mean losses.
    """
    if config.steps % config.log_every:
        raise ConfigError(f"stage1.steps={config.steps} must be a multiple of log_every")
    num_subsets = inputs.members_TxS.shape[0]
    check_config(config, num_subsets)
    cached_k = getattr(inputs, "top_idx_NxK", None)
    if cached_k is not None and cached_k.shape[1] != min(config.top_k, inputs.logits_NxC.shape[1]):
        raise ConfigError(
            f"the inputs cache the base model's top-{cached_k.shape[1]} classes but "
            f"stage1.top_k={config.top_k}; build them with make_inputs(..., this config)"
        )
    sharding.check_divisible("number of subsets T", num_subsets, mesh, sharding.OPS)
    tx = make_optimizer(config)
    ops = initial_operators(inputs, config, key, dims=dims, make_ops=make_ops)
    run_key = jax.random.split(key)[1]
    newton.check_config(config, ops)
    ckpts = checkpoint.TrainCheckpoints(f"{workdir}/stage1_ckpt") if workdir else None
    try:
        resume = ckpts is not None and ckpts.latest_step() is not None
        if not resume:  # a restored state replaces the start, so do not compute it
            ops = newton.initialise(ops, inputs, config, mesh)
        graphdef, state = init_state(ops, tx)
        shardings = state_shardings(state, mesh, num_subsets)
        state = jax.device_put(state, shardings)
        if resume:
            abstract = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
            )
            state = ckpts.restore(abstract)
            logging.info("stage 1: resumed from step %d", int(state["step"]))
        history = []
        if int(state["step"]) < config.steps:
            chunk = build_train_chunk(graphdef, tx, inputs, config, mesh, shardings)
            state, history = _train_loop(chunk, state, run_key, config, ckpts)
    finally:
        if ckpts is not None:
            ckpts.close()
    return graphdef, state["params"], history


def _train_loop(chunk, state, run_key, config, ckpts):
    """Run the remaining chunks; returns (final state, per-chunk mean losses).

    No host round trip waits on a chunk: the step count is known on the host, each chunk's
    loss terms start copying to the host as soon as it is dispatched, and they are read (and
    logged) after the next chunk has been dispatched, so the device never idles on logging.
    Checkpoint saves (every ``ckpt_every`` steps) do wait for their state."""
    history = []
    start = int(state["step"])
    t0 = time.time()
    pending = None  # (step, device loss terms) of the last dispatched chunk
    for i in range(start // config.log_every, config.steps // config.log_every):
        state, terms = chunk(state, run_key)
        step = (i + 1) * config.log_every
        for value in terms.values():
            value.copy_to_host_async()
        if pending is not None:
            history.append(_log_chunk(*pending, start, t0, config))
        pending = (step, terms)
        if ckpts is not None and (step % config.ckpt_every == 0 or step == config.steps):
            ckpts.save(step, state)
    if pending is not None:
        history.append(_log_chunk(*pending, start, t0, config))
    return state, history


def _log_chunk(step: int, terms: dict, start: int, t0: float, config) -> dict:
    """Read one chunk's mean loss terms (copied to the host already) and log them."""
    terms = {k: float(v) for k, v in terms.items()}
    rate = (step - start) / max(time.time() - t0, 1e-9)
    logging.info(
        "stage 1 step %d/%d  fidelity %.4f  stability %.5f  linearity %.3g  (%.1f steps/s)",
        step,
        config.steps,
        terms["fidelity"],
        terms["stability"],
        terms["linearity"],
        rate,
    )
    return {"step": step, **terms}
