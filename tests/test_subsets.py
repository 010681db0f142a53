"""Subset designs: invariants checked against plain-numpy reconstructions."""

import jax
import numpy as np
import pytest

import stride_jax.stride.subsets as subsets
from stride_jax.stride.subsets import (
    Design,
    bernoulli,
    expander,
    interleaved,
    make_design,
    retention_masks,
)

# (T, N, d): ordinary, d == T, N < T, T == 1, N*d not divisible by T, d == 1, many rounds,
# N*d < T (a single partial round: some subsets empty).
EXPANDER_CASES = [
    (10, 50, 3),
    (7, 7, 7),
    (20, 5, 4),
    (1, 9, 1),
    (7, 11, 3),
    (13, 17, 5),
    (5, 100, 1),
    (6, 40, 5),
    (3, 2, 2),
    (64, 301, 9),
    (50, 3, 2),
]


def dense_from_members(members, t, n):
    """Independent reconstruction of A from members_TxS (sentinel == n)."""
    a = np.zeros((t, n), np.int64)
    for k in range(t):
        for i in members[k]:
            if i < n:
                a[k, i] += 1
    return a


def dense_from_subsets(subs, t, n):
    """Independent reconstruction of A from subsets_NxD (sentinel == t)."""
    a = np.zeros((t, n), np.int64)
    for i in range(n):
        for k in subs[i]:
            if k < t:
                a[k, i] += 1
    return a


@pytest.mark.parametrize("t,n,d", EXPANDER_CASES)
def test_expander_invariants(t, n, d):
    des = expander(jax.random.key(t * 1000 + n * 10 + d), t, n, d)
    assert des.kind == "expander"
    assert des.num_subsets == t and des.num_examples == n
    assert des.members_TxS.shape[0] == t
    assert des.subsets_NxD.shape == (n, d)  # left-d-regular: no padding needed

    subs = np.asarray(des.subsets_NxD)
    # Every example: exactly d distinct, valid subsets (no sentinel, no duplicates).
    assert subs.min() >= 0 and subs.max() < t
    for row in subs:
        assert len(set(row.tolist())) == d

    # Every member id is a valid example or the sentinel n; no example listed twice per subset.
    mem = np.asarray(des.members_TxS)
    assert mem.min() >= 0 and mem.max() <= n
    for row in mem:
        real = row[row < n].tolist()
        assert len(set(real)) == len(real)

    a_mem = dense_from_members(mem, t, n)
    a_sub = dense_from_subsets(subs, t, n)
    np.testing.assert_array_equal(a_mem, a_sub)
    assert a_mem.max() <= 1

    a = des.dense()
    assert a.shape == (t, n) and a.dtype == np.float32
    np.testing.assert_array_equal(a, a_mem.astype(np.float32))
    np.testing.assert_array_equal(a.sum(0), np.full(n, d))  # every column sums to d

    sizes = a_mem.sum(1)
    assert sizes.max() - sizes.min() <= 1
    assert sizes.sum() == n * d
    np.testing.assert_array_equal(des.sizes_T, sizes)
    np.testing.assert_array_equal(des.degrees_N, np.full(n, d))


@pytest.mark.parametrize("t,n,d", [(10, 50, 3), (7, 11, 3)])
def test_expander_sparse_products_match_dense(t, n, d):
    """The module docstring's gather identities for A @ b and A.T @ r."""
    des = expander(jax.random.key(3), t, n, d)
    a = dense_from_members(des.members_TxS, t, n).astype(np.float64)
    rng = np.random.default_rng(0)
    b, r = rng.normal(size=n), rng.normal(size=t)
    np.testing.assert_allclose(np.append(b, 0.0)[des.members_TxS].sum(-1), a @ b, rtol=1e-12)
    np.testing.assert_allclose(np.append(r, 0.0)[des.subsets_NxD].sum(-1), a.T @ r, rtol=1e-12)


def test_expander_straddling_examples_many_keys():
    """d close to T over many rounds: every straddling example must still get d distinct."""
    t, n, d = 5, 23, 4
    for seed in range(15):
        des = expander(jax.random.key(seed), t, n, d)
        a = dense_from_subsets(des.subsets_NxD, t, n)
        assert a.max() <= 1
        np.testing.assert_array_equal(a.sum(0), np.full(n, d))
        assert np.ptp(a.sum(1)) <= 1
        np.testing.assert_array_equal(a, dense_from_members(des.members_TxS, t, n))


def test_expander_deterministic_and_key_dependent():
    t, n, d = 10, 50, 3
    a1 = expander(jax.random.key(7), t, n, d)
    a2 = expander(jax.random.key(7), t, n, d)
    b = expander(jax.random.key(8), t, n, d)
    np.testing.assert_array_equal(a1.members_TxS, a2.members_TxS)
    np.testing.assert_array_equal(a1.subsets_NxD, a2.subsets_NxD)
    assert not np.array_equal(a1.dense(), b.dense())


def test_expander_round_trip_arrays():
    des = expander(jax.random.key(0), 10, 50, 3)
    back = Design.from_arrays(des.to_arrays(), "expander")
    np.testing.assert_array_equal(back.members_TxS, des.members_TxS)
    np.testing.assert_array_equal(back.subsets_NxD, des.subsets_NxD)
    np.testing.assert_array_equal(back.dense(), des.dense())


@pytest.mark.parametrize("t,n,d", EXPANDER_CASES + [(2000, 2000, 5), (30, 30, 5)])
def test_interleaved_invariants(t, n, d):
    """Every example in exactly d distinct subsets, sizes within one, both tables agree (the
    expander's layout where no repeat-free swap exists, e.g. d == T)."""
    des = interleaved(jax.random.key(t * 1000 + n * 10 + d), t, n, d)
    a = dense_from_subsets(des.subsets_NxD, t, n)
    assert a.max() <= 1
    np.testing.assert_array_equal(a.sum(0), np.full(n, d))
    assert np.ptp(a.sum(1)) <= 1
    np.testing.assert_array_equal(a, dense_from_members(des.members_TxS, t, n))
    np.testing.assert_array_equal(des.dense(), a.astype(np.float32))
    assert des.kind in ("interleaved", "expander")
    if d == t > 1:  # every example in every subset: a repeat has no partner to swap with
        assert des.kind == "expander"


def test_interleaved_removes_the_expanders_blocks():
    """When d divides T, the expander's blocks of T / d consecutive examples each meet every
    subset once, so A loses rank; the interleaved layout does not."""
    for t, n, d, lost in [(60, 60, 5, 4), (40, 30, 4, 2)]:
        key = jax.random.key(t + n)
        blocks = dense_from_subsets(expander(key, t, n, d).subsets_NxD, t, n)
        mixed = dense_from_subsets(interleaved(key, t, n, d).subsets_NxD, t, n)
        assert np.linalg.matrix_rank(blocks) == n - lost
        assert np.linalg.matrix_rank(mixed) == n
        np.testing.assert_array_equal(mixed.sum(1), np.full(t, n * d // t))


def test_interleaved_deterministic_and_dispatched():
    key = jax.random.key(5)
    a, b = interleaved(key, 40, 40, 5), make_design(key, "interleaved", 40, 40, 5)
    np.testing.assert_array_equal(a.members_TxS, b.members_TxS)
    assert not np.array_equal(a.dense(), interleaved(jax.random.key(6), 40, 40, 5).dense())


@pytest.mark.parametrize("builder", [expander, interleaved, bernoulli])
@pytest.mark.parametrize(
    "t,n,d,match",
    [
        (3, 10, 4, r"d=4 exceeds the number of subsets T=3"),
        (0, 10, 1, r"number of subsets T must be >= 1, got 0"),
        (-2, 10, 1, r"number of subsets T must be >= 1"),
        (5, 0, 1, r"number of training examples N must be >= 1, got 0"),
        (5, 10, 0, r"degree d must be >= 1, got 0"),
        (5, 10, -1, r"degree d must be >= 1, got -1"),
    ],
)
def test_design_argument_errors(builder, t, n, d, match):
    with pytest.raises(ValueError, match=match):
        builder(jax.random.key(0), t, n, d)


def test_make_design_dispatch_and_unknown_kind():
    key = jax.random.key(1)
    e = make_design(key, "expander", 10, 50, 3)
    np.testing.assert_array_equal(e.dense(), expander(key, 10, 50, 3).dense())
    b = make_design(key, "bernoulli", 10, 50, 3)
    np.testing.assert_array_equal(b.dense(), bernoulli(key, 10, 50, 3).dense())
    with pytest.raises(ValueError, match=r"unknown design kind 'random'"):
        make_design(key, "random", 10, 50, 3)


def test_bernoulli_degrees_vary_and_mean_matches():
    t, n, d = 20, 4000, 4
    des = bernoulli(jax.random.key(0), t, n, d)
    assert des.kind == "bernoulli"
    a_mem = dense_from_members(des.members_TxS, t, n)
    a_sub = dense_from_subsets(des.subsets_NxD, t, n)
    np.testing.assert_array_equal(a_mem, a_sub)
    np.testing.assert_array_equal(des.dense(), a_mem.astype(np.float32))
    assert a_mem.max() <= 1

    deg = a_mem.sum(0)
    np.testing.assert_array_equal(des.degrees_N, deg)
    np.testing.assert_array_equal(des.sizes_T, a_mem.sum(1))
    assert len(np.unique(deg)) > 2  # degrees vary (unlike the expander)
    # Degree ~ Binomial(T, d/T): mean d, sd of the mean sqrt(d (1 - d/T) / N) ~ 0.028.
    assert abs(deg.mean() - d) < 0.15
    # Variance of a binomial: d (1 - d/T) = 3.2.
    assert abs(deg.var() - d * (1 - d / t)) < 0.5


def test_bernoulli_zero_degree_examples_use_sentinel():
    """Small p: some examples are in no subset; their rows are all sentinel T."""
    t, n = 50, 200
    des = bernoulli(jax.random.key(2), t, n, 1)
    subs = np.asarray(des.subsets_NxD)
    deg = des.dense().sum(0)
    assert (deg == 0).any()
    assert (subs[deg == 0] == t).all()
    np.testing.assert_array_equal((subs < t).sum(1), deg)


@pytest.mark.parametrize("m,n,alpha", [(6, 50, 0.5), (4, 7, 0.3), (3, 10, 1.0), (5, 5, 0.5)])
def test_retention_masks(m, n, alpha):
    masks = np.asarray(retention_masks(jax.random.key(0), m, n, alpha))
    assert masks.shape == (m, n) and masks.dtype == bool
    keep = max(1, round(alpha * n))
    np.testing.assert_array_equal(masks.sum(1), np.full(m, keep))
    again = np.asarray(retention_masks(jax.random.key(0), m, n, alpha))
    np.testing.assert_array_equal(masks, again)
    if keep < n:
        assert len({row.tobytes() for row in masks}) > 1  # rows differ
        other = np.asarray(retention_masks(jax.random.key(1), m, n, alpha))
        assert not np.array_equal(masks, other)


def test_retention_masks_rows_roughly_uniform():
    """Each example is kept in ~alpha of the retrains."""
    masks = np.asarray(retention_masks(jax.random.key(4), 1000, 10, 0.5))
    freq = masks.mean(0)
    assert np.all(np.abs(freq - 0.5) < 0.06)  # sd 0.016 per example


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_retention_masks_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=r"retention alpha must be in \(0, 1\]"):
        retention_masks(jax.random.key(0), 3, 10, alpha)


@pytest.mark.parametrize("m,n", [(0, 10), (3, 0)])
def test_retention_masks_bad_counts(m, n):
    with pytest.raises(ValueError, match=r"num_models >= 1 and N >= 1"):
        retention_masks(jax.random.key(0), m, n, 0.5)


def test_dense_refuses_huge(monkeypatch):
    des = expander(jax.random.key(0), 10, 50, 3)  # 500 entries
    monkeypatch.setattr(subsets, "_MAX_DENSE", 499)
    with pytest.raises(ValueError, match=r"dense design of 10 x 50 is too large"):
        des.dense()
    monkeypatch.setattr(subsets, "_MAX_DENSE", 500)
    assert des.dense().shape == (10, 50)


def test_bernoulli_design_has_no_empty_subset_even_when_sparse():
    design = subsets.bernoulli(jax.random.key(5), 2000, 1400, 5)  # ~3% of rows would be empty
    dense = design.dense()
    assert dense.sum(1).min() >= 1
    assert (design.sizes_T == dense.sum(1)).all()
