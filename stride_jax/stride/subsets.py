"""Subset designs: which training examples each steering operator is trained on.

A design is a binary matrix ``A_TxN`` (T subsets, N training examples). We never store it
densely: ``members_TxS`` lists each subset's examples (padded with the sentinel ``N``) and
``subsets_NxD`` lists each example's subsets (padded with the sentinel ``T``). Appending one
zero to a length-N (or length-T) vector makes the sentinel gather a no-op, so
``A @ b == b_pad[members_TxS].sum(-1)`` and ``A.T @ r == r_pad[subsets_NxD].sum(-1)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.errors import ConfigError
from stride_jax.stride.operators import layer_norm_noaffine

_MAX_DENSE = 1 << 28


@dataclasses.dataclass(frozen=True)
class Design:
    """Sparse view of a T x N membership matrix (see module docstring)."""

    members_TxS: np.ndarray
    subsets_NxD: np.ndarray
    kind: str

    @property
    def num_subsets(self) -> int:
        """T, the number of subsets (rows of A)."""
        return int(self.members_TxS.shape[0])

    @property
    def num_examples(self) -> int:
        """N, the number of training examples (columns of A)."""
        return int(self.subsets_NxD.shape[0])

    @property
    def sizes_T(self) -> np.ndarray:
        """|S_k| of every subset (padding entries, = N, do not count)."""
        return (self.members_TxS < self.num_examples).sum(-1)

    @property
    def degrees_N(self) -> np.ndarray:
        return (self.subsets_NxD < self.num_subsets).sum(-1)

    def dense(self) -> np.ndarray:
        """The T x N float32 matrix; refused when it would be huge."""
        t, n = self.num_subsets, self.num_examples
        if t * n > _MAX_DENSE:
            raise ValueError(f"dense design of {t} x {n} is too large; use the sparse form")
        a = np.zeros((t, n + 1), np.float32)
        np.put_along_axis(a, self.members_TxS, 1.0, axis=1)
        return a[:, :n]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"members_TxS": self.members_TxS, "subsets_NxD": self.subsets_NxD}

    @classmethod
    def from_arrays(cls, arrays, kind: str) -> Design:
        return cls(np.asarray(arrays["members_TxS"]), np.asarray(arrays["subsets_NxD"]), kind)


def _check(num_subsets: int, num_examples: int, degree: int) -> None:
    if num_subsets < 1:
        raise ValueError(f"number of subsets T must be >= 1, got {num_subsets}")
    if num_examples < 1:
        raise ValueError(f"number of training examples N must be >= 1, got {num_examples}")
    if degree < 1:
        raise ValueError(f"degree d must be >= 1, got {degree}")
    if degree > num_subsets:
        raise ValueError(f"degree d={degree} exceeds the number of subsets T={num_subsets}")


def _pad_rows(rows_of_ids: np.ndarray, owner: np.ndarray, n_rows: int, sentinel: int):
    """Group ``rows_of_ids`` by ``owner`` into a padded (n_rows, width) int32 table."""
    order = np.argsort(owner, kind="stable")
    owner_sorted, ids_sorted = owner[order], rows_of_ids[order]
    counts = np.bincount(owner_sorted, minlength=n_rows)
    width = max(int(counts.max(initial=0)), 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    col = np.arange(owner_sorted.size) - starts[owner_sorted]
    table = np.full((n_rows, width), sentinel, np.int32)
    table[owner_sorted, col] = ids_sorted
    return table


def _from_pairs(subset_ids: np.ndarray, example_ids: np.ndarray, t: int, n: int, kind: str):
    members = _pad_rows(example_ids, subset_ids, t, sentinel=n)
    subsets = _pad_rows(subset_ids, example_ids, n, sentinel=t)
    return Design(np.sort(members, -1), np.sort(subsets, -1), kind)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _round_permutations(key: jax.Array, num_rounds: int, num_subsets: int) -> jax.Array:
    """One random permutation of the T subsets per round (num_rounds x T), compiled as one
    program: op by op, a fresh process compiled the key split and the shuffle separately."""
    keys = jax.random.split(key, num_rounds)
    return jax.vmap(lambda k: jax.random.permutation(k, num_subsets))(keys)


def expander(key: jax.Array, num_subsets: int, num_examples: int, degree: int) -> Design:
    """Left-d-regular design: each example in exactly ``degree`` distinct subsets.

    Subsets are filled in rounds, each a random permutation of all T subsets, and example
    i takes the next d slots; so subset sizes differ by at most one. Where an example's d
    slots straddle two rounds, the new round is reordered so its slots stay distinct.
    """
    _check(num_subsets, num_examples, degree)
    t, n, d = num_subsets, num_examples, degree
    total = n * d
    num_rounds = -(-total // t)
    perms = np.array(_round_permutations(key, num_rounds, t))
    for r in range(1, num_rounds):
        carried = (r * t) % d  # slots of the straddling example already in round r-1
        if carried == 0:
            continue
        taken = perms[r - 1, t - carried :]
        need = d - carried
        clash = np.isin(perms[r], taken)
        fresh = perms[r][~clash]
        perms[r] = np.concatenate([fresh[:need], perms[r][clash], fresh[need:]])
    stream = perms.reshape(-1)[:total]
    return _from_pairs(stream, np.repeat(np.arange(n), d), t, n, "expander")


def interleaved(key: jax.Array, num_subsets: int, num_examples: int, degree: int) -> Design:
    """Left-d-regular design without the rounds' blocks: each example in exactly ``degree``
    distinct subsets, sizes within one of each other, as ``expander``, but example i takes
    the stream's slots i, i + N, ..., i + (d - 1) N instead of d consecutive ones.

    ``expander`` gives each example d consecutive slots of a stream of random permutations
    of the T subsets, so (when d divides T) each permutation is filled by a block of T / d
    examples that meets every subset exactly once: ``A 1_block`` is the same for every such
    block, and the differences of the blocks' indicators are null directions of A (at T = N
    with d = 5: 4 of them, so A has rank N - 4 and a block's total influence is not
    identified). Interleaved, each example's d slots lie in d different stretches of the
    stream (at T = N: one slot in each of d independent permutations, the sum-of-
    permutations construction of random regular bipartite graphs). Where one example would
    get a subset twice, that slot is swapped with another slot of the same permutation (sizes
    unchanged) that creates no repeat; if none exists (T close to d), the ``expander`` layout
    is used instead. The permutations come from numpy's PCG64 seeded with the key's data
    (deterministic per key; no program to compile, where ``expander``'s jitted shuffle took
    0.2-0.5 s of a fresh process's first fit)."""
    _check(num_subsets, num_examples, degree)
    t, n, d = num_subsets, num_examples, degree
    total = n * d
    num_rounds = -(-total // t)
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    rng = np.random.default_rng(seed)
    stream = np.concatenate([rng.permutation(t) for _ in range(num_rounds)])[:total]
    pos_NxD = np.arange(n)[:, None] + n * np.arange(d)[None]  # example i's stream slots
    if not _repair_repeats(stream, pos_NxD, t, n):
        return expander(key, num_subsets, num_examples, degree)
    return _from_pairs(stream[pos_NxD].reshape(-1), np.repeat(np.arange(n), d), t, n, "interleaved")


def _repair_repeats(stream: np.ndarray, pos_NxD: np.ndarray, t: int, n: int) -> bool:
    """Swap (in place) each slot that repeats a subset of its example with a slot of the same
    permutation (stream stretch of length t) whose swap repeats nothing; False when some slot
    has no such partner."""
    total = stream.size
    for i in np.flatnonzero([len(set(row)) < len(row) for row in stream[pos_NxD]]):
        for j in range(pos_NxD.shape[1]):
            row = stream[pos_NxD[i]]
            if (row == row[j]).sum() == 1:
                continue
            p = int(pos_NxD[i, j])
            start = (p // t) * t
            for q in range(start, min(start + t, total)):
                k, jj = q % n, q // n
                if k == i or stream[q] in row or stream[p] in np.delete(stream[pos_NxD[k]], jj):
                    continue
                stream[p], stream[q] = stream[q], stream[p]
                break
            else:
                return False
    return True


def bernoulli(key: jax.Array, num_subsets: int, num_examples: int, degree: int) -> Design:
    """Ablation design: each entry of A is Bernoulli(degree / T), so degrees vary.

    Conditioned on no subset being empty: an empty row gets one uniformly random example
    (an operator with no members has nothing to learn).
    """
    _check(num_subsets, num_examples, degree)
    k_bern, k_fill = jax.random.split(key)
    a = np.array(jax.random.bernoulli(k_bern, degree / num_subsets, (num_subsets, num_examples)))
    fill = np.asarray(jax.random.randint(k_fill, (num_subsets,), 0, num_examples))
    empty = ~a.any(1)
    a[np.flatnonzero(empty), fill[empty]] = True
    subset_ids, example_ids = np.nonzero(a)
    return _from_pairs(subset_ids, example_ids, num_subsets, num_examples, "bernoulli")


_BUILDERS = {"expander": expander, "interleaved": interleaved, "bernoulli": bernoulli}
KINDS = tuple(_BUILDERS)  # ``stride.design.kind`` also takes "auto" (``method.design_kind``)


def make_design(key: jax.Array, kind: str, num_subsets: int, num_examples: int, degree: int):
    if kind not in _BUILDERS:
        raise ValueError(f"unknown design kind {kind!r}; choose one of {sorted(_BUILDERS)}")
    return _BUILDERS[kind](key, num_subsets, num_examples, degree)


def retention_masks(key: jax.Array, num_models: int, num_examples: int, alpha: float):
    """LDS subsets: ``num_models`` random subsets of exactly round(alpha * N) examples.

    Returns a bool array M x N (True = kept for that retrain).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"retention alpha must be in (0, 1], got {alpha}")
    if num_models < 1 or num_examples < 1:
        raise ValueError(f"need num_models >= 1 and N >= 1, got {num_models}, {num_examples}")
    keep = max(1, round(alpha * num_examples))
    keys = jax.random.split(key, num_models)
    scores = jax.vmap(lambda k: jax.random.uniform(k, (num_examples,)))(keys)
    ranks = np.argsort(np.argsort(np.asarray(scores), axis=1), axis=1)
    return ranks < keep


def sketched_design(design: Design, config, key: jax.Array, feats_NxD) -> jax.Array:
    """The sketched design A P (T x M), with a fixed random P (N x M) drawn from ``key``.

    ``config.sketch`` = "gaussian": P has i.i.d. N(0, 1/M) entries (the paper's sketch);
    "features": P = LN(feats) R with R a random D x M Gaussian, columns standardised, so the
    sketched datamodel b = P c says "an example's influence is linear in its features".
    """
    n, m = design.num_examples, config.sketch_dim
    if config.sketch == "gaussian":
        proj_NxM = jax.random.normal(key, (n, m)) / np.sqrt(m)
    elif config.sketch == "features":
        h = layer_norm_noaffine(jnp.asarray(feats_NxD))
        proj_NxM = h @ jax.random.normal(key, (h.shape[1], m))
        proj_NxM = (proj_NxM - proj_NxM.mean(0)) / (proj_NxM.std(0) + 1e-6) / np.sqrt(m)
    else:
        raise ConfigError(f"stage1.sketch must be 'gaussian' or 'features', got {config.sketch!r}")
    proj_pad = jnp.concatenate([proj_NxM, jnp.zeros((1, m))])
    return proj_pad[jnp.asarray(design.members_TxS)].sum(1)
