"""The passes over rows behind the kernel operators (``stride.kernels``): the subset sums of
the members' kernel gradients (fused into EK-FAC's factors pass, ``fused_fit``, or a pass of
their own in a low-rank basis, ``subset_gradients``), the gates they define (``gates``), the
first-order responses of the T operators to Q query rows (``responses_fn``) and
operator-space influence in the kernel space (``opspace_scores``). Pure functions of a task,
its steered ``layers`` and arrays, jitted; the site and its config live in ``kernels``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.func import curvature, grads, programs


def data_io(task, layers):
    """Rows -> (inputs, output gradients) per layer under the data's labels."""

    def io(params, rows):
        a_L, _, [(_, g_L)] = task.dense_io(params, rows, layers, "empirical", None)
        return a_L, g_L

    return io


def input_basis(state: dict, rank: int = 0) -> dict:
    """The curvature in the operators' coordinates: per kernel the top-``rank`` eigenvectors
    of its input factor A (``qa``, I x r; 0 or >= I: all), the output factor's eigenbasis
    (``qs``) and the damped corrected eigenvalues of those rows (``lam``, r x O). With r < I
    each operator reads only the kernel input's top-r principal directions: the paper's
    low-rank basis phi, here the PCA of the layer's input, and P shrinks by I / r."""
    out = {"qa": [], "qs": list(state["qs"]), "lam": []}
    for qa, lam in zip(state["qa"], state["lam"], strict=True):
        top = top_directions(qa, rank)
        out["qa"].append(top)
        out["lam"].append(lam[lam.shape[0] - top.shape[1] :])
    return out


def top_directions(qa, rank: int):
    """The top-``rank`` eigenvectors of an input factor's eigenbasis (I x r; 0: all). eigh
    orders eigenvalues ascending, so the top r are the last r columns."""
    return qa[:, qa.shape[1] - _rank(qa.shape[1], rank) :]


def _rank(width: int, rank: int) -> int:
    """The input directions kept of a kernel ``width`` wide: ``rank``, 0 meaning all."""
    return width if rank <= 0 else min(rank, width)


def rotated(a_L, g_L, basis) -> list[jax.Array]:
    """Rows' kernel gradients in the eigenbases, ``Q_A^T G Q_S`` per kernel (B x r x O), from
    the inputs and output gradients (projected first: G is never formed at full size)."""
    return [
        curvature.row_grads(a @ qa, g @ qs)
        for a, g, qa, qs in zip(a_L, g_L, basis["qa"], basis["qs"], strict=True)
    ]


def subset_gradients(task, layers, data: dict, design, chunk: int, basis: dict) -> list[jax.Array]:
    """Each subset's mean of its members' kernel gradients rotated into ``basis``
    (``rotated``), per kernel T x r x O, accumulated chunk by chunk of training rows (memory
    T x P, never N x P)."""
    t = design.num_subsets
    sizes, subsets_NxD, idx = _design_tables(design, chunk)
    chunks, w = curvature.chunked(data, chunk)
    key = ("kernel_subset_gradients", tuple(layers), t)
    fn = programs.per_task(task, key, lambda: _subset_fn(task, tuple(layers), t))
    return fn(task.params, chunks, w, idx, subsets_NxD, sizes, basis)


def _design_tables(design, chunk: int):
    """(|S_k| floored at 1 as float32 (T,), subsets_NxD, each chunk's row indices K x C, 0
    on padding rows: their weight is 0) as device arrays, built on the host: op by op in jax
    a fresh process compiled a program for each step. The chunks are ``grads.padded_chunks``'s,
    so the indices line up with the chunked rows."""
    n = design.num_examples
    chunk = grads.chunk_size(n, chunk)
    idx = np.pad(np.arange(n, dtype=np.int32), (0, -n % chunk)).reshape(-1, chunk)
    sizes = np.maximum(design.sizes_T, 1).astype(np.float32)
    return jnp.asarray(sizes), jnp.asarray(design.subsets_NxD), jnp.asarray(idx)


def scatter(acc_L, rg_L, w_C, i_C, subsets_NxD, sizes_T):
    """``acc_L`` (per kernel T x ...) plus each row's ``rg`` (C x ...) shared over its
    subsets (weight w / |S_k|; padding rows and slots beyond T add nothing)."""
    t = acc_L[0].shape[0]
    sub_CxD = subsets_NxD[i_C]
    share_CxD = w_C[:, None] / sizes_T[jnp.minimum(sub_CxD, t - 1)]
    out = []
    for g_T, rg in zip(acc_L, rg_L, strict=True):
        add = share_CxD[..., None, None] * rg[:, None]
        out.append(g_T.at[sub_CxD].add(add, mode="drop"))
    return out


def fused_fit(task, ek, eigen_correct: bool, design, rank: int = 0):
    """EK-FAC's state at the config ``ek`` (``kernels.ekfac_config``: STRIDE's settings) and
    each subset's mean of its members' kernel gradients, accumulated in a pass over the rows
    that the curvature makes anyway: two passes over the training rows in all, not three.

    - At full rank (``rank`` 0) the means stay in the kernels' own coordinates: per kernel
      T x I x O, each row's ``sum_t a_t g_t^T`` with no rotation. With ``eigen_correct``
      (EK-FAC) they ride along the eigenvalue-correction pass; without (K-FAC: one pass in
      all) along the Kronecker factors' pass. Returns (state, means, "subset_sums", ok). The
      responses rotate the Q preconditioned query gradients back instead (Q << N). On
      lm_shakespeare that is 36 G multiply-adds fewer, and the wall time moved within the
      host's noise.
    - With a ``rank`` (EK-FAC only) they need the eigenbasis, so they ride along the
      eigenvalue-correction pass in the eigenbases it has just computed: per kernel
      T x r x O, ``Q_A^T g_k Q_S`` with ``Q_A`` cut to its top ``rank`` input directions
      (``input_basis``). Returns (state, means, "subset_grads", ok).

    ``ok`` (a device bool) says whether every row's gradient was finite (``_into_subsets``).
    Under the empirical Fisher the curvature's backward pass is the data labels' own; under
    the true Fisher the data's labels take a second backward from the same forward
    (``task.dense_io(with_data=True)``)."""
    from stride_jax.methods import influence

    n, t = design.num_examples, design.num_subsets
    if n != len(task.train):
        raise ValueError(f"the design has {n} examples, the task {len(task.train)} train rows")
    if not eigen_correct and rank > 0:
        raise ValueError("without the eigenvalue correction the means are fused at full rank only")
    sizes, subsets_NxD, idx = _design_tables(design, int(ek.chunk))
    layers = tuple(task.dense_layers(ek))
    io_shapes = influence.dense_shapes(task, layers)

    # The design's tables ride in the accumulator (not closed over), so the pass is one
    # program per task, whatever the design (``programs.per_task``). So does a flag: whether
    # every update added to the sums was finite (``_into_subsets``).
    tables, ok = (subsets_NxD, sizes), jnp.asarray(True)
    if rank <= 0:
        init = (_zeros(tuple((t, i, o) for i, o in io_shapes)), tables, ok)
        on = "eigen" if eigen_correct else "factors"
        state, acc = influence._kfac_fit(task, ek, eigen_correct, (init, _sums_step, idx), on)
        return state, acc[0], "subset_sums", acc[2]

    init = (_zeros(tuple((t, _rank(i, rank), o) for i, o in io_shapes)), tables, ok)
    step = _rotated_step(rank)
    state, acc = influence._kfac_fit(task, ek, True, extra=(init, step, idx), extra_pass="eigen")
    return state, acc[0], "subset_grads", acc[2]


@functools.partial(jax.jit, static_argnums=0)
def _zeros(shapes: tuple) -> list[jax.Array]:
    """float32 zeros of each shape: one program (op by op, one per distinct shape)."""
    return [jnp.zeros(s, jnp.float32) for s in shapes]


def _sums_step(acc, rows, w_C, i_C, out, *eigenbases):
    """``fused_fit``'s step at full rank: each row's ``sum_t a_t g_t^T`` under the data labels
    (``out[0]``, ``out[3]``) into its subsets' sums; ``eigenbases`` (EK-FAC's pass) unused."""
    del rows, eigenbases
    rg = [curvature.row_grads(a, g) for a, g in zip(out[0], out[3], strict=True)]
    return _into_subsets(acc, rg, w_C, i_C)


@functools.cache
def _rotated_step(rank: int):
    """``fused_fit``'s step with a ``rank``: the rows' gradients in the eigenbases, the input
    side cut to its top ``rank`` directions (one function per rank: it keys the program)."""

    def step(acc, rows, w_C, i_C, out, qa, qs):
        del rows
        basis = {"qa": [top_directions(q, rank) for q in qa], "qs": qs}
        return _into_subsets(acc, rotated(out[0], out[3], basis), w_C, i_C)

    return step


def _into_subsets(acc, rg_L, w_C, i_C):
    """The fused steps' accumulator ``(sums, (subsets_NxD, sizes), ok)`` with the rows'
    gradients ``rg_L`` scattered into their subsets' sums (the design's tables carried
    unchanged) and ``ok`` false once a chunk's gradients are not finite (their sum is checked:
    a NaN or an infinity anywhere makes it non-finite). The fit reads the flag instead of a
    pass of its own over the T x P sums (a program of its own in a fresh process)."""
    sums, tables, ok = acc
    finite = jnp.isfinite(sum(jnp.sum(g) for g in rg_L))
    return scatter(sums, rg_L, w_C, i_C, *tables), tables, ok & finite


def _subset_fn(task, layers, t: int):
    io = data_io(task, layers)

    def row_grads(params, rows, basis):
        return rotated(*io(params, rows), basis)

    def fn(params, chunks, w_KxC, idx_KxC, subsets_NxD, sizes_T, basis):
        def body(acc, xs):
            rows, w_C, i_C = xs
            rg = row_grads(params, rows, basis)
            return scatter(acc, rg, w_C, i_C, subsets_NxD, sizes_T), None

        one = jax.tree.map(lambda a: a[0], chunks)
        shapes = jax.eval_shape(lambda r: row_grads(params, r, basis), one)
        init = [jnp.zeros((t, *x.shape[1:])) for x in shapes]
        return jax.lax.scan(body, init, (chunks, w_KxC, idx_KxC))[0]

    return fn


def gates(params: dict) -> list[jax.Array]:
    """Every operator's gates ``B_k = scale (F + lam)^-1 g_k`` per kernel (T x I x O), from
    ``fit_operators``' params: ``scale Q_A (g~_k / lam) Q_S^T`` (the responses never form
    them)."""
    return _gates(params)


@jax.jit
def _gates(params: dict) -> list[jax.Array]:
    if "subset_sums" in params:  # the kernels' own coordinates: rotate them first
        pairs = zip(params["subset_sums"], params["qa"], params["qs"], strict=True)
        rot = [jnp.einsum("ai,tab,bj->tij", qa, g, qs) for g, qa, qs in pairs]
    else:
        rot = params["subset_grads"]
    return [
        params["scale"] * jnp.einsum("ir,tro,jo->tij", qa, g / lam, qs)
        for g, qa, qs, lam in zip(rot, params["qa"], params["qs"], params["lam"], strict=True)
    ]


def dots(a_L, b_L) -> jax.Array:
    """sum over kernels of <a, b>: A x B from rotated gradients (A x r x O, B x r x O)."""
    return sum(curvature.flat_dots(a, b) for a, b in zip(a_L, b_L, strict=True))


def preconditioned(a_L, g_L, basis) -> list[jax.Array]:
    """Rows' ``(F + lam)^-1 G`` in the eigenbases: their rotated gradients over lam."""
    rot = rotated(a_L, g_L, basis)
    return [x / lam for x, lam in zip(rot, basis["lam"], strict=True)]


_DOT_BYTES = 1 << 28  # query gradients per block of the responses' contraction (256 MiB)


def responses_fn(task, layers, chunk: int):
    """The jitted ``fn(params, data_q, ops) -> y_QxT`` (``_responses``), compiled once per
    task, layers and chunk: a later call with queries of the same shape compiles nothing."""
    key = ("kernel_responses", tuple(layers), int(chunk))
    return programs.per_task(task, key, lambda: _responses(task, tuple(layers), int(chunk)))


def _responses(task, layers, chunk: int):
    """y_QxT = -sum_l <G_q^l, B_k^l> = -scale sum_l <Q_A^T G_q Q_S / lam, g~_k>: query
    gradients ``chunk`` rows at a time, rotated and preconditioned, then one contraction per
    block of queries (``_DOT_BYTES`` of them) against the rotated subset gradients (with
    ``subset_sums``: rotated back, ``Q_A (...) Q_S^T``, against the unrotated ones). The T x P
    subset gradients are read once per block, not once per ``chunk`` of queries: at T = N =
    2,000 they are 0.5 GB, and re-reading them for every 16 queries bound the responses on
    memory bandwidth (lm_shakespeare's 200 queries: 2.6 s -> 1.0 s, compilation included)."""
    io = data_io(task, layers)

    def back(pre_L, ops):
        pairs = zip(pre_L, ops["qa"], ops["qs"], strict=True)
        return [jnp.einsum("ai,qij,bj->qab", qa, p, qs) for p, qa, qs in pairs]

    def pre(params, ops, r):
        p = preconditioned(*io(params, r), ops)
        return back(p, ops) if "subset_sums" in ops else p

    def fn(params, data_q, ops):
        subset = ops["subset_sums"] if "subset_sums" in ops else ops["subset_grads"]
        per_row = 4 * sum(int(np.prod(g.shape[1:])) for g in subset)
        block = max(chunk, _DOT_BYTES // per_row // chunk * chunk)
        block = min(block, -(-grads.num_rows(data_q) // chunk) * chunk)  # no padded blocks

        def rows(r):
            pre_L = grads.map_rows(lambda c: pre(params, ops, c), r, chunk)
            return -ops["scale"] * dots(pre_L, subset)

        return grads.map_rows(rows, data_q, block)

    return fn


def opspace_scores(task, layers, chunk: int, basis: dict, query) -> np.ndarray:
    """``score(q, i) = <(F + lam)^-1 G_q, G_i>`` in the kernel space (``opspace`` with
    hook="kernels"): the queries' rotated gradients once (Q x P), the training rows'
    ``chunk`` at a time. At full rank this is EK-FAC at STRIDE's settings."""
    from stride_jax import methods

    layers, chunk = tuple(layers), int(chunk)
    io = data_io(task, layers)

    def build():
        def fn(params, train, data_q, basis):
            pre_q = grads.map_rows(lambda r: preconditioned(*io(params, r), basis), data_q, chunk)

            def rows(r):
                return dots(rotated(*io(params, r), basis), pre_q)

            return grads.map_rows(rows, train, chunk).T

        return fn

    fn = programs.per_task(task, ("kernel_opspace", layers, chunk), build)
    out = fn(task.params, task.arrays(task.train), task.arrays(query), basis)
    return methods.as_scores(out)
