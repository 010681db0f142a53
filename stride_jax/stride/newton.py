"""A closed-form start for stage 1: one damped Gauss-Newton step from the zero gates.

With the classifier defaults (a small fidelity weight against the stability KL and the gate
L2), each operator's optimum lies close to the zero gates, where its part of the stage-1
objective ``w_f fid_k(B) + w_s stab_k(B) + gate_l2 ||B||^2 / 2`` is nearly quadratic. Its
minimiser is then one Newton step:

    B_k = -w_f ((w_f + w_s) H + gate_l2 I)^-1 g_k

with ``g_k`` the mean over S_k's members of the per-example fidelity gradient at zero gates and
``H`` the Gauss-Newton matrix (the exact Hessian of the truncated KL at the base model)
averaged over all training rows: it stands for both the members' CE curvature and the
non-members' KL curvature (subsets are small next to N, and with ``top_k`` = the number of
classes the two curvatures are the same matrix). ``H`` is shared by all T operators, so one
Cholesky factorisation serves every subset, and the T right-hand sides are solved in one
batched call. Adam steps on the real (nonlinear, linearity-regularised) objective then
refine from there (``stage1.steps``; 0 keeps the Newton gates).

The steered logits are linear in the gates at each site s: ``dlogits/dgates_s[o, r] =
L_s[o, :] f_s[r]`` for a row, with ``f_s`` the site's basis features and ``L_s`` (O x C) the
logits' sensitivity to the site's output (the identity at the logit site; ``diag(act'(a))
W_head`` at a hidden site). Operators list their sites with ``linear_sites``; the blocks of
``H`` are then ``mean_n (L_s M L_t^T)_n (x) (f_s f_t^T)_n``: a (O_s O_t) x (R_s R_t) matmul per
pair of sites instead of materialising per-row Jacobians.

On a mesh (``initialise``), each device of the ``data`` axis accumulates ``H`` and the
gradients over its own row chunks (summed across devices), and each device of the ``ops``
axis solves its own share of the right-hand sides against the one Cholesky factor; the gates
come out split over ``ops``, as stage 1's Adam steps hold them.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from stride_jax import sharding
from stride_jax.errors import ConfigError

INITS = ("zero", "newton")


def _fisher(top_idx_BxK, top_logp_BxK, num_classes: int) -> jax.Array:
    """The truncated KL's Hessian in the logits at the base model: B x C x C
    (``diag(p) - p p^T`` on the base top-K classes, zero elsewhere)."""
    p = jnp.exp(top_logp_BxK)
    m_top = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    e = jax.nn.one_hot(top_idx_BxK, num_classes, dtype=p.dtype)  # B x K x C
    return jnp.einsum("bkc,bkl,bld->bcd", e, m_top, e)


def classifier_chunk_stats(ops, inputs, idx_B, valid_B):
    """A classifier site's ``newton_stats``: (H blocks summed over the chunk's rows,
    per-example fidelity gradients B x P), from the operators' ``linear_sites``."""
    rows = inputs.rows(idx_B)
    sites = ops.linear_sites(rows, inputs.fixed)
    logits = rows["logits"]
    c = logits.shape[-1]
    w = valid_B.astype(logits.dtype)
    delta = jax.nn.softmax(logits, -1) - jax.nn.one_hot(inputs.y_N[idx_B], c, dtype=logits.dtype)
    fisher = _fisher(inputs.top_idx_NxK[idx_B], inputs.top_logp_NxK[idx_B], c)
    fisher = fisher * w[:, None, None]
    blocks = {}
    for s, (_, l_s, f_s) in enumerate(sites):
        lm = jnp.einsum("boc,bcd->bod", l_s, fisher)
        for t in range(s, len(sites)):
            _, l_t, f_t = sites[t]
            q = jnp.einsum("bod,bqd->boq", lm, l_t)
            # One matmul over the rows: (O_s O_t) x B times B x (R_s R_t).
            outer = f_s[:, :, None] * f_t[:, None, :]
            blocks[(s, t)] = jnp.einsum("boq,bru->orqu", q, outer)
    grads = [
        (jnp.einsum("boc,bc->bo", l_s, delta)[:, :, None] * f_s[:, None, :]).reshape(
            f_s.shape[0], -1
        )
        for _, l_s, f_s in sites
    ]
    return blocks, jnp.concatenate(grads, axis=1) * w[:, None]


def _assemble(blocks, sizes) -> jax.Array:
    """The symmetric P x P matrix from its upper blocks ``blocks[(s, t)]`` (O_s, R_s, O_t, R_t)."""
    n = len(sizes)
    rows = []
    for s in range(n):
        row = []
        for t in range(n):
            b = blocks[(s, t)] if s <= t else blocks[(t, s)].transpose(2, 3, 0, 1)
            row.append(b.reshape(sizes[s], sizes[t]))
        rows.append(jnp.concatenate(row, axis=1))
    return jnp.concatenate(rows, axis=0)


def _aggregate(x_NxP, inputs) -> jax.Array:
    """Each subset's mean of its members' rows of ``x_NxP``: T x P (chunked over subsets)."""
    n, p = x_NxP.shape
    members = inputs.members_TxS
    t = members.shape[0]
    chunk = max(1, min(t, (64 << 20) // max(members.shape[1] * p, 1)))  # ~256 MB of gathers
    n_chunks = -(-t // chunk)
    padded = jnp.concatenate([members, jnp.full((n_chunks * chunk - t, members.shape[1]), n)])
    x_pad = jnp.concatenate([x_NxP, jnp.zeros((1, p), x_NxP.dtype)])

    def one(m_CxS):
        sizes = jnp.maximum((m_CxS < n).sum(1, keepdims=True), 1)
        return x_pad[m_CxS].sum(1) / sizes

    out = jax.lax.map(one, padded.reshape(n_chunks, chunk, -1))
    return out.reshape(-1, p)[:t]


def _row_chunks(n: int, chunk: int, groups: int):
    """Row indices (clamped to n - 1) and validity, ``groups*C x chunk``: C chunks per group
    (a device's share of the rows on the mesh's ``data`` axis)."""
    n_chunks = -(-n // chunk)
    n_chunks = -(-n_chunks // groups) * groups
    idx = jnp.arange(n_chunks * chunk)
    valid = (idx < n).reshape(n_chunks, chunk)
    return jnp.minimum(idx, n - 1).reshape(n_chunks, chunk), valid


def _scan_rows(ops, inputs, idx_CxB, valid_CxB, per_subset: bool):
    """(H blocks summed over the chunks' rows; per_subset: the T x P subset means of G summed
    over those rows, else G of the chunks' rows C x B x P), one chunk per scan step."""
    n = inputs.num_rows
    t = inputs.members_TxS.shape[0]
    shape_blocks, shape_g = jax.eval_shape(
        lambda: inputs.newton_stats(ops, idx_CxB[0], valid_CxB[0])
    )
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape_blocks)
    if not per_subset:

        def body(blocks, xs):
            b, g_BxP = inputs.newton_stats(ops, *xs)
            return jax.tree_util.tree_map(jnp.add, blocks, b), g_BxP

        return jax.lax.scan(body, zeros, (idx_CxB, valid_CxB))
    sizes_T = jnp.maximum((inputs.members_TxS < n).sum(1), 1).astype(jnp.float32)

    def body_subsets(carry, xs):
        blocks, g_TxP = carry
        b, g_BxP = inputs.newton_stats(ops, *xs)
        sub_BxD = inputs.subsets_NxD[xs[0]]
        share_BxD = 1.0 / sizes_T[jnp.minimum(sub_BxD, t - 1)]
        g_TxP = g_TxP.at[sub_BxD].add(share_BxD[..., None] * g_BxP[:, None, :], mode="drop")
        return (jax.tree_util.tree_map(jnp.add, blocks, b), g_TxP), None

    g0 = jnp.zeros((t, shape_g.shape[1]), shape_g.dtype)
    return jax.lax.scan(body_subsets, (zeros, g0), (idx_CxB, valid_CxB))[0]


def curvature_and_gradients(ops, inputs, chunk: int = 0, per_subset: bool = False, *, mesh=None):
    """(``H`` P x P, mean over the training rows; ``G`` N x P, the per-example fidelity
    gradients at zero gates), streamed over row chunks of ``chunk``. A subset's gradient
    ``g_k`` is the mean of its members' rows of G (``_aggregate``); with ``per_subset``
    those T x P means are accumulated chunk by chunk instead of G (memory T x P, not N x P;
    the same up to float rounding).

    With a ``mesh`` the row chunks are split over its ``data`` axis: each device scans its own
    chunks and the sums are added across devices (a psum), so only the order of the
    additions changes; one device scans them all, as without a mesh."""
    n = inputs.num_rows
    groups = 1 if mesh is None else sharding.size(mesh, sharding.DATA)
    idx, valid = _row_chunks(n, chunk or inputs.newton_batch, groups)
    if mesh is None:
        out = _scan_rows(ops, inputs, idx, valid, per_subset)
    else:
        graphdef, state = nnx.split(ops)

        def local(state, inputs, idx, valid):
            part = _scan_rows(nnx.merge(graphdef, state), inputs, idx, valid, per_subset)
            if per_subset:
                return jax.lax.psum(part, sharding.DATA)
            blocks, g_CxBxP = part
            return jax.lax.psum(blocks, sharding.DATA), g_CxBxP

        rows, rep = sharding.spec(sharding.DATA), sharding.spec()
        out_specs = rep if per_subset else (rep, rows)
        fn = sharding.shard_map(local, mesh, (rep, rep, rows, rows), out_specs)
        out = fn(state, inputs, idx, valid)
    blocks, g = out
    num_sites = max(s for s, _ in blocks) + 1
    sizes = [blocks[(s, s)].shape[0] * blocks[(s, s)].shape[1] for s in range(num_sites)]
    if not per_subset:
        g = g.reshape(-1, g.shape[-1])[:n]
    return _assemble(blocks, sizes) / n, g


# Above this many bytes of per-example gradients (N x P) the subset means are accumulated as
# the rows stream (digits and MNIST stay below it: their numbers are unchanged).
_MAX_G_BYTES = 2**30


def newton_gates(ops, inputs, config, mesh=None) -> list[jax.Array]:
    """The damped Gauss-Newton gates of every operator, one array (T x O_s x R_s) per site of
    ``ops.linear_sites`` (in its order).

    The step is linear in the gradients, so the solve runs on whichever is fewer: the T
    subset gradients, or the N per-example gradients (then averaged over each subset). With
    a ``mesh``, the curvature's rows are split over ``data`` (``curvature_and_gradients``)
    and the right-hand sides over ``ops``: each device solves its own columns against the
    one (replicated) Cholesky factor."""
    n, t = inputs.num_rows, inputs.members_TxS.shape[0]
    p = jax.eval_shape(lambda: curvature_and_gradients(ops, inputs))[1].shape[1]
    per_subset = t <= n and 4 * n * p > _MAX_G_BYTES
    h_PxP, g_XxP = curvature_and_gradients(ops, inputs, per_subset=per_subset, mesh=mesh)
    damped = (config.w_fidelity + config.w_stability) * h_PxP + config.gate_l2 * jnp.eye(p)
    factor = jax.scipy.linalg.cho_factor(damped)

    def solve_block(c_PxP, rhs_XxP):
        return -config.w_fidelity * jax.scipy.linalg.cho_solve((c_PxP, factor[1]), rhs_XxP.T).T

    def solve(rhs_XxP):
        if mesh is None:
            return solve_block(factor[0], rhs_XxP)
        padded, x = sharding.pad_to_multiple(rhs_XxP, sharding.size(mesh, sharding.OPS))
        cols, rep = sharding.spec(sharding.OPS), sharding.spec()
        return sharding.shard_map(solve_block, mesh, (rep, cols), cols)(factor[0], padded)[:x]

    g_NxP = g_XxP
    if per_subset:
        b_TxP = solve(g_XxP)
    elif t <= n:
        b_TxP = solve(_aggregate(g_NxP, inputs))
    else:
        b_TxP = _aggregate(solve(g_NxP), inputs)
    out, start = [], 0
    for _, o, r in inputs.newton_sites(ops):
        out.append(b_TxP[:, start : start + o * r].reshape(-1, o, r))
        start += o * r
    return out


def gates_matrix(ops, inputs) -> jax.Array:
    """Every operator's gates flattened in the gradients' layout (``newton_sites``): T x P."""
    sites = inputs.newton_sites(ops)
    return jnp.concatenate([m.gates[...].reshape(m.num_subsets, -1) for m, _, _ in sites], 1)


def row_gradients(ops, inputs) -> jax.Array:
    """The loss gradients at zero gates of every row of ``inputs`` (N x P), chunk by chunk as
    ``curvature_and_gradients`` takes them, without its curvature (for query rows, whose
    curvature nothing reads)."""
    n = inputs.num_rows
    idx, valid = _row_chunks(n, inputs.newton_batch, 1)
    g_CxBxP = jax.lax.map(lambda xs: inputs.newton_stats(ops, *xs)[1], (idx, valid))
    return g_CxBxP.reshape(-1, g_CxBxP.shape[-1])[:n]


def linear_responses(ops, inputs) -> jax.Array:
    """The first-order responses ``y_k(q) ~= -g_q . vec(B_k)`` of every operator on the rows
    of ``inputs`` (their loss gradients g_q at zero gates, ``row_inputs``): Q x T. One
    gradient per query instead of a forward pass per operator."""
    return -row_gradients(ops, inputs) @ gates_matrix(ops, inputs).T


def _init(config) -> str:
    """``config.init``; stage-1 configs written before it existed mean the zero start."""
    return config.get("init", "zero") if hasattr(config, "get") else config.init


def check_init(config) -> str:
    """``config.init``, refused unless it is one of ``INITS``."""
    init = _init(config)
    if init not in INITS:
        raise ConfigError(f"stage1.init must be one of {INITS}, got {init!r}")
    return init


def check_config(config, ops) -> None:
    if check_init(config) == "newton":
        if not hasattr(ops, "linear_sites"):
            raise ConfigError(
                f"stage1.init='newton' needs operators that list their linear sites; "
                f"{type(ops).__name__} does not (use init='zero')"
            )
        if config.w_fidelity <= 0:
            raise ConfigError("stage1.init='newton' needs stage1.w_fidelity > 0")
        if config.gate_l2 <= 0 and config.w_stability <= 0:
            raise ConfigError("stage1.init='newton' needs stage1.gate_l2 > 0 or w_stability > 0")


def initialise(ops, inputs, config, mesh=None):
    """Set ``ops``' gates to the Newton step (``config.init == 'newton'``); returns ``ops``.
    The step is jitted on ``mesh`` (default: one device): operators and inputs in
    replicated, the gates out split over ``ops`` (``newton_gates``)."""
    check_config(config, ops)
    if _init(config) != "newton":
        return ops
    t0 = time.time()
    mesh = mesh if mesh is not None else sharding.make_mesh()
    graphdef, state = nnx.split(ops)
    num_sites = len(inputs.newton_sites(ops))
    rep = sharding.replicated(mesh)
    gates_out = [sharding.along(mesh, sharding.OPS, 3)] * num_sites
    if inputs.members_TxS.shape[0] % sharding.size(mesh, sharding.OPS):
        gates_out = [rep] * num_sites

    # The inputs are an argument, not a closure: captured, their arrays became constants of
    # the compiled step, which XLA then spent seconds constant-folding at 1M rows.
    def solve(state, inputs):
        gates = newton_gates(nnx.merge(graphdef, state), inputs, config, mesh)
        return gates, jnp.all(jnp.stack([jnp.isfinite(g).all() for g in gates]))

    gates, finite = sharding.jit(solve, (rep, rep), (gates_out, rep))(state, inputs)
    gates = jax.block_until_ready(gates)
    if not bool(finite):  # replicated: every process reads its own copy
        raise FloatingPointError(
            "stage 1: the Gauss-Newton gates are not finite (the damped curvature could not "
            f"be factored in float32): raise stage1.gate_l2 (now {config.gate_l2})"
        )
    for (module, _, _), g in zip(inputs.newton_sites(ops), gates, strict=True):
        module.gates[...] = g
    logging.info(
        "stage 1: Gauss-Newton start for %d operators (%d gate parameters each) in %.1fs",
        gates[0].shape[0],
        sum(g[0].size for g in gates),
        time.time() - t0,
    )
    return ops
