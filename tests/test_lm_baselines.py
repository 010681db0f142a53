"""Language-model baselines against plain loops, numpy and scikit-learn on a tiny decoder."""

import collections
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_decoder_task
from flax import nnx
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from stride_jax import methods
from stride_jax.func import curvature, projections
from stride_jax.methods import grad as grad_methods
from stride_jax.methods import influence, similarity
from stride_jax.models import lm_train

RECIPE = dict(steps=300, batch=16, lr=1e-2, warmup_steps=10, lr_end_frac=0.1, clip=1.0)


@pytest.fixture(scope="module")
def setup():
    model = dict(family="gpt2", d_model=32, n_kv_heads=None)
    sp, task = tiny_decoder_task(32, 200, 8, model, dict(RECIPE, weight_decay=0.01))
    return task, sp.query


CASES = [
    ("graddot", {}),
    ("gradcos", {}),
    ("trak", dict(num_models=2, proj_dim=64)),
    ("logra", dict(init="pca", rank_in=4, rank_out=4)),
    ("ekfac", {}),
    ("kfac", {}),
    ("repsim", {}),
    ("tfidf", {}),
    ("bm25", {}),
    ("random", {}),
]


@pytest.fixture(scope="module")
def dec_task(setup):
    return setup


def _new(name, task, query, **kw):
    method = methods.get(name, "decoder")
    cfg = method.default_config("decoder")
    cfg.update(kw)
    return method.score(task, method.fit(task, cfg), query, cfg)


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_every_method_runs(dec_task, name, kw):
    task, query = dec_task
    scores = _new(name, task, query, **kw)
    assert scores.shape == (len(query), len(task.train)) and scores.dtype == np.float32
    assert np.isfinite(scores).all() and scores.std() > 0


@pytest.fixture(scope="module")
def ref(setup):
    """Per-row loss gradients of all params by a Python loop of jax.grad: flat {path: N x ...}."""
    task, query = setup
    grad = jax.jit(
        jax.grad(lambda p, t, a, m: lm_train.example_losses(task.graphdef, p, t, a, m)[0])
    )

    def grads(blocks):
        d = jax.tree.map(np.asarray, task.data(blocks))
        rows = zip(d["tokens"], d["attn"], d["loss_mask"], strict=True)
        per_row = [grad(task.params, t[None], a[None], m[None]) for t, a, m in rows]
        flat = [nnx.to_flat_state(g) for g in per_row]
        return {
            "/".join(map(str, k)): np.stack([np.asarray(f[i][1], np.float64) for f in flat])
            for i, (k, _) in enumerate(flat[0])
        }

    return grads(task.train), grads(query)


def _pick(g, pattern):
    """N x P: the gradients of the params whose path matches ``pattern``, concatenated."""
    return np.concatenate([v.reshape(len(v), -1) for k, v in g.items() if re.search(pattern, k)], 1)


MLP1 = "^layers/1/mlp/"


def test_graddot_matches_loop(dec_task, ref):
    got = _new("graddot", *dec_task)
    want = _pick(ref[1], MLP1) @ _pick(ref[0], MLP1).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_tracin_is_lr_weighted_graddot_over_the_replayed_trajectory(dec_task):
    """Two checkpoints (the last is the base model): sum_c lr_c x graddot at theta_c."""
    task, query = dec_task
    tracin = methods.get("tracin", "decoder")
    cfg = tracin.default_config("decoder")
    cfg.num_checkpoints = 2
    state = tracin.fit(task, cfg)  # checks the replay ends at task.params
    got = tracin.score(task, state, query, cfg)
    r, t = task.recipe, np.arange(task.recipe.steps)  # warmup from 0, then cosine to the end lr
    cos = 0.5 * (1 + np.cos(np.pi * (t - r.warmup_steps) / (r.steps - r.warmup_steps)))
    end = r.lr * r.lr_end_frac
    lr_T = np.where(t < r.warmup_steps, r.lr * t / r.warmup_steps, end + (r.lr - end) * cos)
    np.testing.assert_allclose(state["lr_C"], [lr_T[:150].mean(), lr_T[150:].mean()], rtol=1e-5)
    want = lr_T[150:].mean() * _new("graddot", task, query)
    mid = dataclasses.replace(task, params=state["ckpts"][0])
    want = want + lr_T[:150].mean() * _new("graddot", mid, query)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_graddot_sign_copy_of_a_training_row_scores_itself_highest(dec_task):
    task, _ = dec_task
    rows = np.array([0, 17, 42, 99, 150, 151, 180, 199])  # 8 rows, as the query set
    for name in ("graddot", "gradcos"):
        scores = _new(name, task, task.train.subset(rows))
        np.testing.assert_array_equal(scores.argmax(axis=1), rows)
    cos = _new("gradcos", task, task.train.subset(rows))
    np.testing.assert_allclose(cos[np.arange(8), rows], 1.0, atol=1e-4)


def test_trak_identity_projection_matches_numpy(dec_task, ref):
    """Raw gradients of a params_filter subset (P = 96 < N; test_trak covers the dual solve)."""
    pattern = "^layers/1/mlp/proj/bias|^layers/1/norm2/"
    kw = dict(proj_dim=0, params_filter=pattern, damping=0.05, chunk=64)
    got = _new("trak1", *dec_task, **kw)
    g_tr, g_q = _pick(ref[0], pattern), _pick(ref[1], pattern)
    p = g_tr.shape[1]
    lam = 0.05 * np.trace(g_tr.T @ g_tr) / p
    want = g_q @ np.linalg.solve(g_tr.T @ g_tr + lam * np.eye(p), g_tr.T)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_trak_streamed_projection_equals_stored_projection(dec_task):
    """R regenerated block by block per row == R = projections.projection kept whole."""
    task, query = dec_task
    cfg = grad_methods.default_config("trak", "decoder")
    names, key = task.param_names(cfg), projections.projection_key(cfg.seed, 0)
    args = (task.params, key, task.arrays(query))
    dense = grad_methods.trak_features(task, names, 64, cfg.chunk, True)(*args)[0]
    streamed = grad_methods.trak_features(task, names, 64, cfg.chunk, False)(*args)[0]
    np.testing.assert_allclose(streamed, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())


def test_logra_features_are_projected_explicit_gradients(dec_task, ref):
    task, _ = dec_task
    cfg = grad_methods.default_config("logra", "decoder")
    cfg.update(rank_in=3, rank_out=5, chunk=3)
    paths = task.dense_layers(cfg)
    assert paths == ("layers/1/mlp/fc", "layers/1/mlp/proj")
    projs = grad_methods.logra_projections(task, paths, cfg)
    rows = task.train.subset(np.arange(5))
    phi = np.asarray(
        grad_methods.logra_features(task, paths, 3)(task.params, projs, task.arrays(rows))
    )
    for name, (p_in, p_out), cols in zip(
        ["fc", "proj"], projs, [slice(0, 15), slice(15, 30)], strict=True
    ):
        G = ref[0][f"layers/1/mlp/{name}/kernel"][:5]
        want = np.einsum("ia,nio,ob->nab", np.asarray(p_in), G, np.asarray(p_out)).reshape(5, -1)
        np.testing.assert_allclose(phi[:, cols], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_ekfac_eigenvalues_and_large_damping_limit(dec_task, ref):
    """Lambda against explicit per-row kernel gradients; damping -> inf gives graddot / lam."""
    task, query = dec_task
    cfg = influence.default_config("ekfac", "decoder")
    state = influence.ekfac_fit(task, cfg)
    assert state["layers"] == ("layers/1/mlp/fc", "layers/1/mlp/proj")
    want, damped = 0.0, []
    for i, name in enumerate(["fc", "proj"]):
        G = ref[0][f"layers/1/mlp/{name}/kernel"]
        qa, qs = (np.asarray(state[k][i], np.float64) for k in ("qa", "qs"))
        lam = (np.einsum("ai,nab,bj->nij", qa, G, qs) ** 2).mean(0)
        np.testing.assert_allclose(state["lam"][i], lam + cfg.damping * lam.mean(), rtol=1e-3)
        damped.append(jnp.asarray(lam + 1e8 * lam.mean(), jnp.float32))
        g_q = ref[1][f"layers/1/mlp/{name}/kernel"].reshape(len(query), -1)
        want = want + g_q @ G.reshape(len(G), -1).T / (1e8 * lam.mean())
    got = influence.kfac_score(task, dict(state, lam=damped), query, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    # fisher="sampled": same input factors A, output factors S from the model's own samples.
    chunks, w = curvature.chunked(task.arrays(task.train), cfg.chunk)

    def factors(fisher, key):
        def io(rows, k):
            return task.dense_io(task.params, rows, state["layers"], fisher, k)

        return curvature.kron_factors(io, chunks, w, key)

    emp, smp = factors("empirical", None), factors("sampled", jax.random.key(0))
    for (a_e, s_e), (a_s, s_s) in zip(emp, smp, strict=True):
        np.testing.assert_allclose(a_s, a_e, rtol=1e-6)
        assert np.isfinite(s_s).all() and np.linalg.eigvalsh(s_s).min() > -1e-6
        assert not np.allclose(s_s, s_e)


def test_repsim_matches_numpy(dec_task):
    task, query = dec_task
    got = _new("repsim", task, query)
    model = nnx.merge(task.graphdef, task.params)

    tok = np.concatenate([query.tokens_NxL, task.train.tokens_NxL])
    attn = np.concatenate([query.attn_mask_NxL, task.train.attn_mask_NxL])
    h = np.asarray(model.final_norm(model.blocks(model.embed(jnp.asarray(tok)), attn)))
    pooled = (h * attn[..., None]).sum(1) / attn.sum(1, keepdims=True)
    want = cosine_similarity(pooled[: len(query)], pooled[len(query) :])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_tfidf_matches_sklearn(dec_task):
    task, query = dec_task
    got = _new("tfidf", task, query)
    decode = task.tokenizer.decode
    tr = [decode(t[t > 0].tolist()) for t in task.train.tokens_NxL]
    q = [decode(t[t > 0].tolist()) for t in query.tokens_NxL]
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True).fit(tr)
    want = cosine_similarity(vec.transform(q), vec.transform(tr))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bm25_matches_python_loop(dec_task):
    task, query = dec_task
    got = _new("bm25", task, query)
    words = TfidfVectorizer().build_analyzer()  # sklearn's default word tokens
    docs = [words(s) for s in similarity.texts(task.tokenizer, task.train)]
    avgdl, n = sum(map(len, docs)) / len(docs), len(docs)
    df = collections.Counter(w for d in docs for w in set(d))
    want = np.zeros(got.shape)
    for i, qtext in enumerate(similarity.texts(task.tokenizer, query)):
        for j, d in enumerate(docs):
            tf = collections.Counter(d)
            for w in words(qtext):
                if tf[w]:
                    idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                    norm = 1.5 * (1 - 0.75 + 0.75 * len(d) / avgdl)
                    want[i, j] += idf * tf[w] * 2.5 / (tf[w] + norm)
    assert want.max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sampled_labels_follow_the_softmax():
    """``layers.sample_labels`` (inverse CDF, the sampled Fisher's labels): the frequencies of
    200,000 draws per row match softmax(logits) within 4 standard errors; a class of
    probability 0 (logit -inf) is never drawn; the draws are reproducible per key."""
    from scipy import stats

    from stride_jax.func import layers

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7)) * np.array([[0.1], [1.0], [4.0]])
    logits[1, 2] = -np.inf
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    draws = 200_000
    x = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, 3, 7))
    labels = np.asarray(layers.sample_labels(jax.random.key(1), x))
    assert labels.shape == (draws, 3) and labels.dtype == np.int32
    for r in range(3):
        freq = np.bincount(labels[:, r], minlength=7) / draws
        se = np.sqrt(p[r] * (1 - p[r]) / draws)
        np.testing.assert_array_less(np.abs(freq - p[r]), 4 * se + 1e-12)
        assert stats.chisquare(freq[p[r] > 0] * draws, p[r][p[r] > 0] * draws).pvalue > 1e-3
    assert (labels[:, 1] != 2).all()
    again = np.asarray(layers.sample_labels(jax.random.key(1), x))
    np.testing.assert_array_equal(labels, again)
