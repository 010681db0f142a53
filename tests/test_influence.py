"""Influence functions: exact IF vs a float64 numpy finite-difference reference, K-FAC / EK-FAC
vs dense Fisher influence (exact where the Kronecker factorisation is exact), a user's own NNX
module, API checks."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from scipy.stats import spearmanr

from stride_jax import methods
from stride_jax.data import Dataset
from stride_jax.func import grads
from stride_jax.methods import influence
from stride_jax.models import mlp
from stride_jax.task import TaskError
from stride_jax.tasks import ClassifierTask


def _dataset(x, y):
    return Dataset(np.asarray(x, np.float32), np.asarray(y, np.int32), np.arange(len(y)))


def _model_config(hidden, steps):
    return ml_collections.ConfigDict(dict(hidden=hidden, steps=steps, lr=3e-2, weight_decay=1e-2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fit(hidden, steps, num_classes, key, x, y):
    x, y = x.astype(jnp.float32), y.astype(jnp.int32)
    return mlp.fit(_model_config(hidden, steps), key, x, y, jnp.ones(len(y)), num_classes)


def make_task(hidden, n=10, n_query=6, in_dim=4, num_classes=3, seed=0, steps=100, same_x=False):
    """A small MLP trained (full-batch AdamW) on random data with a linear teacher."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(in_dim, num_classes))
    x = rng.normal(size=(n + n_query, in_dim))
    if same_x:
        x[:n] = x[0]
    y = np.argmax(x @ teacher + rng.normal(size=(n + n_query, num_classes)), axis=1)
    if same_x:
        y[:n] = np.arange(n) % num_classes
    cfg = _model_config(hidden, steps)
    graphdef, _ = mlp.abstract(cfg, in_dim, num_classes)
    params = _fit(hidden, steps, num_classes, jax.random.key(seed), x[:n], y[:n])
    train, query = _dataset(x[:n], y[:n]), _dataset(x[n:], y[n:])
    task = ClassifierTask(
        graphdef=graphdef, params=params, train=train, query=query, num_classes=num_classes
    )
    return task, query


def _config(name, **overrides):
    cfg = influence.default_config(name, "classifier")
    cfg.update(overrides)
    return cfg


def run(name, task, query, **overrides):
    cfg = _config(name, **overrides)
    method = methods.get(name, "classifier")
    out = method.score(task, method.fit(task, cfg), query, cfg)
    assert out.dtype == np.float32 and out.shape == (len(query), len(task.train))
    assert np.isfinite(out).all()
    return out


# ------------------------------------------------ float64 numpy reference (exact IF)


def _np_weights(task, params=None):
    model = nnx.merge(task.graphdef, task.params if params is None else params)
    return [
        (np.asarray(m.kernel[...], np.float64), np.asarray(m.bias[...], np.float64))
        for m in [*model.layers, model.head]
    ]


def _pack(weights):
    return np.concatenate([np.concatenate([k.ravel(), b]) for k, b in weights])


def _unpack(theta, shapes):
    out, i = [], 0
    for din, dout in shapes:
        k = theta[i : i + din * dout].reshape(din, dout)
        b = theta[i + din * dout : i + din * dout + dout]
        out.append((k, b))
        i += din * dout + dout
    return out


def _np_losses(theta, shapes, x, y):
    h = np.asarray(x, np.float64)
    ws = _unpack(theta, shapes)
    for i, (k, b) in enumerate(ws):
        h = h @ k + b
        if i < len(ws) - 1:  # tanh-approximate GELU, as jax.nn.gelu's default
            h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    h = h - h.max(axis=1, keepdims=True)
    logp = h - np.log(np.exp(h).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _np_exact_scores(task, query, damping, eps=1e-4):
    weights = _np_weights(task)
    shapes = [k.shape for k, _ in weights]
    theta = _pack(weights)
    p = theta.size
    x, y = task.train.x_NxF, task.train.y_N
    basis = np.eye(p) * eps

    def f(t):
        return _np_losses(t, shapes, x, y).mean()

    hess = np.zeros((p, p))
    for i in range(p):
        for j in range(i, p):
            ei, ej = basis[i], basis[j]
            val = f(theta + ei + ej) - f(theta + ei - ej) - f(theta - ei + ej) + f(theta - ei - ej)
            hess[i, j] = hess[j, i] = val / (4 * eps**2)

    def grads(xs, ys):  # per-example gradients, N x P, central differences
        cols = [
            (_np_losses(theta + e, shapes, xs, ys) - _np_losses(theta - e, shapes, xs, ys))
            / (2 * eps)
            for e in basis
        ]
        return np.stack(cols, axis=1)

    g_tr, g_q = grads(x, y), grads(query.x_NxF, query.y_N)
    return g_q @ np.linalg.solve(hess + damping * np.eye(p), g_tr.T), hess


@pytest.fixture(scope="module")
def tiny():
    """hidden=(3,), 10 training examples, 3 classes: P = 27."""
    return make_task(hidden=(3,))


@pytest.fixture(scope="module")
def generic():
    """hidden=(8,), 40 training examples: K-FAC is only an approximation here."""
    return make_task(hidden=(8,), n=40, n_query=10, in_dim=6, seed=1, steps=150)


def test_exact_if_matches_float64_finite_differences(tiny):
    task, query = tiny
    assert grads.num_params(task.params, None) == 4 * 3 + 3 + 3 * 3 + 3
    ref, hess_ref = _np_exact_scores(task, query, damping=1e-2)
    # influence.hessian is in ravel_pytree order; map it to this file's packing order
    flat, unravel = ravel_pytree(task.params)
    perm = _pack(_np_weights(task, unravel(jnp.arange(flat.size, dtype=jnp.float32))))
    perm = perm.astype(int)
    hess = np.asarray(influence.hessian(task, None, chunk=3))[np.ix_(perm, perm)]
    np.testing.assert_allclose(hess, hess_ref, atol=1e-4 * np.abs(hess_ref).max())
    got = run("exact_if", task, query, damping=1e-2, chunk=3)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_exact_if_sign_self_influence_positive():
    # Softmax regression is convex: H + damping I is positive definite, so each training
    # example's self-influence g^T H^-1 g is positive (upweighting it lowers its own loss).
    task, _ = make_task(hidden=(), n=10)
    s = run("exact_if", task, task.train, damping=1e-3)
    assert (np.diag(s) > 0).all()


# ------------------------------------------------ K-FAC / EK-FAC vs dense Fisher influence


@functools.partial(jax.jit, static_argnums=0)
def _grads(graphdef, params, x_BxF, y_B):
    """B x P per-example loss gradients (ravel_pytree order), by vmap of jax.grad."""

    def loss(p, x, y):
        return mlp.cross_entropy(mlp.apply(graphdef, p, x[None]), y[None])[0]

    return jax.vmap(lambda x, y: ravel_pytree(jax.grad(loss)(params, x, y))[0])(x_BxF, y_B)


def _dense_fisher_scores(task, query, damping, fisher="empirical"):
    x, y = jnp.asarray(task.train.x_NxF), jnp.asarray(task.train.y_N)
    g_tr = np.asarray(_grads(task.graphdef, task.params, x, y), np.float64)
    if fisher == "empirical":
        fis = g_tr.T @ g_tr / len(y)
    else:  # E_x sum_c p_c(x) g_c g_c^T (Gauss-Newton for softmax cross-entropy)
        probs = np.asarray(jax.nn.softmax(task.logits(x)), np.float64)
        fis = 0
        for c in range(task.num_classes):
            yc = jnp.full_like(y, c)
            g_c = np.asarray(_grads(task.graphdef, task.params, x, yc))
            fis = fis + (g_c * probs[:, c : c + 1]).T @ g_c / len(y)
    xq, yq = jnp.asarray(query.x_NxF), jnp.asarray(query.y_N)
    g_q = np.asarray(_grads(task.graphdef, task.params, xq, yq), np.float64)
    return g_q @ np.linalg.solve(fis + damping * np.eye(fis.shape[0]), g_tr.T)


def test_dense_io_gives_per_example_layer_gradients():
    # two hidden layers: a_l g_l^T per example is the gradient of [kernel; bias] of layer l
    task, _ = make_task(hidden=(5, 4), n=7, steps=5)
    layers = task.dense_layers()
    assert layers == ("layers/0", "layers/1", "head")  # input to output
    batch = task.arrays(task.train)
    acts, mask, [(weight, g_layers)] = jax.jit(lambda p: task.dense_io(p, batch, layers))(
        task.params
    )
    assert mask.shape == (7, 1) and np.all(np.asarray(weight) == 1)
    per_example = jax.vmap(
        lambda x, y: jax.grad(lambda p: task.loss(p, {"x": x[None], "y": y[None]})[0])(task.params)
    )(batch["x"], batch["y"])
    for path, a, g in zip(layers, acts, g_layers, strict=True):
        node = per_example
        for part in path.split("/"):
            node = node[int(part) if part.isdigit() else part]
        want = np.concatenate([node["kernel"][...], node["bias"][...][:, None]], axis=1)
        got = np.einsum("bti,bto->bio", np.asarray(a), np.asarray(g))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["same_inputs", "single_example"])
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_kfac_ekfac_exact_when_kronecker_is_exact(case, fisher):
    # Softmax regression: one Linear layer. Identical training inputs make a a^T constant, a
    # single training example makes everything constant: then E[aa^T (x) gg^T] = A (x) S.
    if case == "same_inputs":
        task, query = make_task(hidden=(), n=10, same_x=True)
    else:
        task, query = make_task(hidden=(), n=1)
    ref = _dense_fisher_scores(task, query, damping=1e-3, fisher=fisher)
    scale = np.abs(ref).max()
    for name in ("kfac", "ekfac"):
        got = run(name, task, query, damping=1e-3, fisher=fisher)
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * scale, err_msg=name)


def _layer_fisher_blocks(task, fisher):
    """Dense per-layer Fisher blocks over vec([kernel; bias]) (row-major), from jax.grad."""
    x, y = jnp.asarray(task.train.x_NxF), jnp.asarray(task.train.y_N)
    _, unravel = ravel_pytree(task.params)

    def mats(g_flat):
        model = nnx.merge(task.graphdef, unravel(g_flat))
        return [
            jnp.concatenate([m.kernel[...], m.bias[...][None]]).ravel()
            for m in [*model.layers, model.head]
        ]

    if fisher == "empirical":
        terms = [(np.ones(len(y)), y)]
    else:
        probs = np.asarray(jax.nn.softmax(task.logits(x)), np.float64)
        terms = [(probs[:, c], jnp.full_like(y, c)) for c in range(task.num_classes)]
    blocks = 0
    layer_grads = jax.jit(
        lambda labels: jax.vmap(mats)(_grads(task.graphdef, task.params, x, labels))
    )
    for wt, labels in terms:
        g = layer_grads(labels)
        new = [(np.asarray(v, np.float64) * wt[:, None]).T @ np.asarray(v) / len(y) for v in g]
        blocks = new if blocks == 0 else [u + v for u, v in zip(blocks, new, strict=True)]
    return blocks


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_ekfac_eigenvalues_are_the_fisher_diagonal_in_the_kfac_eigenbasis(generic, fisher):
    # EK-FAC's Lambda is diag(K^T F_l K) with K = Q_A (x) Q_S, hence the best approximation
    # K diag(.) K^T of the layer's Fisher block in Frobenius norm: at least as good as K-FAC.
    task, _ = generic
    cfg = _config("ekfac", fisher=fisher, damping=0.0)  # the fitted Lambda, undamped
    ek, kf = influence.ekfac_fit(task, cfg), influence.kfac_fit(task, cfg)
    for i, block in enumerate(_layer_fisher_blocks(task, fisher)):
        k = np.kron(np.asarray(ek["qa"][i], np.float64), np.asarray(ek["qs"][i], np.float64))
        diag = np.einsum("pi,pq,qi->i", k, block, k)
        lam = np.asarray(ek["lam"][i]).ravel()
        np.testing.assert_allclose(lam, diag, rtol=1e-3, atol=1e-5 * diag.max())
        err_ek = np.linalg.norm(k @ np.diag(lam) @ k.T - block)
        err_kf = np.linalg.norm(k @ np.diag(np.asarray(kf["lam"][i]).ravel()) @ k.T - block)
        assert err_ek <= err_kf * (1 + 1e-4), (i, err_ek, err_kf)


def test_ekfac_at_least_as_close_as_kfac_generic(generic):
    task, query = generic
    dense = _dense_fisher_scores(task, query, 1e-2)
    kfac = run("kfac", task, query, damping=1e-2)
    ekfac = run("ekfac", task, query, damping=1e-2)
    exact = run("exact_if", task, query, damping=1e-1)
    kfac_1 = run("kfac", task, query, damping=1e-1)
    ekfac_1 = run("ekfac", task, query, damping=1e-1)

    def rho(a, b):
        return spearmanr(a.ravel(), b.ravel())[0]

    print(f"kfac~dense {rho(kfac, dense):.3f} ekfac~dense {rho(ekfac, dense):.3f}")
    print(f"kfac~exact {rho(kfac_1, exact):.3f} ekfac~exact {rho(ekfac_1, exact):.3f}")
    assert rho(ekfac, dense) >= rho(kfac, dense)
    assert rho(kfac_1, exact) > 0.4 and rho(ekfac_1, exact) > 0.4


# ------------------------------------------------ API


def test_shapes_chunking_and_errors(tiny):
    task, query = tiny
    for name, fisher in (("exact_if", "empirical"), ("kfac", "true"), ("ekfac", "empirical")):
        a = run(name, task, query, chunk=3, fisher=fisher)
        b = run(name, task, query, chunk=1000, fisher=fisher)
        # Other chunks sum the float32 per-example terms in another order: up to ~6e-5 of the
        # largest score for exact_if (an ill-conditioned solve) under the suite's unoptimised
        # XLA (conftest), ~3e-6 under XLA's default. A chunking bug is off by O(1).
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert {"exact_if", "kfac", "ekfac"} <= set(methods.names("classifier"))
    assert {"kfac", "ekfac"} <= set(methods.names("decoder"))
    cfg = _config("exact_if", max_exact_params=grads.num_params(task.params, None) - 1)
    with pytest.raises(ValueError, match="max_exact_params"):
        influence.exact_fit(task, cfg)
    with pytest.raises(ValueError, match="fisher"):
        influence.kfac_fit(task, _config("kfac", fisher="bogus"))
    # kfac on a restricted subset: the head alone (a whole Linear layer) is fine, half a layer
    # (its kernel without its bias) is refused
    head = run("kfac", task, query, params_filter="^head/")
    assert np.abs(head).max() > 0
    with pytest.raises(TaskError, match="whole nnx.Linear"):
        influence.kfac_fit(task, _config("kfac", params_filter="kernel"))


# ------------------------------------------------ a user's own NNX module


class _NoBias(nnx.Module):
    """Softmax regression without a bias, the layer held in a dict-like attribute."""

    def __init__(self, rngs):
        self.parts = nnx.Dict(out=nnx.Linear(4, 3, use_bias=False, rngs=rngs))

    def __call__(self, x):
        return self.parts["out"](x)


class _Normed(nnx.Module):
    def __init__(self, rngs):
        self.norm, self.out = nnx.LayerNorm(4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.norm(x))


def _user_task(module, same_x: bool):
    task, query = make_task(hidden=(), n=10, same_x=same_x)
    graphdef, params = nnx.split(module(nnx.Rngs(0)), nnx.Param)
    user = ClassifierTask(
        graphdef=graphdef, params=params, train=task.train, query=query, num_classes=3
    )
    return user, query


def test_user_module_without_bias_matches_dense_fisher():
    task, query = _user_task(_NoBias, same_x=True)
    assert task.dense_layers() == ("parts/out",)
    ref = _dense_fisher_scores(task, query, damping=1e-3)
    for name in ("kfac", "ekfac"):
        got = run(name, task, query, damping=1e-3)
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_user_module_with_other_parameters_is_refused():
    task, query = _user_task(_Normed, same_x=False)
    with pytest.raises(TaskError, match="norm/"):
        influence.kfac_fit(task, _config("kfac"))
    assert run("kfac", task, query, params_filter="^out/").shape == (len(query), 10)
