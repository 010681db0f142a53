"""Our TRAK against MadryLab's reference implementation (``traker``, PyTorch).

Slow and optional: needs the ``crosscheck`` extra (``torch==2.13.0``, ``traker==0.3.2``; install
the CPU build of torch first, since PyPI's Linux default is the CUDA build); skipped when either is
missing; ``traker``'s CUDA projector (``fast_jl``) is not needed. The tiny digits MLP is
trained with our recipe, its weights are copied into an equivalent ``torch.nn.Sequential`` and both
implementations score the same queries with no projection (our ``proj_dim = 0``, traker's
``NoOpProjector``), one model, the same ridge:

- traker divides every feature by sqrt(P) (P = number of parameters) before the kernel, so its
  ``lambda_reg`` equals our absolute ``damping`` / P;
- traker rescales (X^T X + lambda I)^-1 by its mean absolute entry, so its scores equal ours up
  to one positive constant; ranks are compared, and the scores after a least-squares scale.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from scipy.stats import spearmanr
from sklearn.datasets import load_digits

from stride_jax import methods
from stride_jax.data import Dataset
from stride_jax.methods import grad as grad_methods
from stride_jax.models import mlp
from stride_jax.tasks import ClassifierTask

N_TRAIN, N_QUERY, HIDDEN, CLASSES = 60, 8, 16, 10
DAMPING = 1.0  # our absolute ridge lambda


def _digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, q = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_QUERY]
    return (
        Dataset(x[tr], y[tr], np.arange(N_TRAIN)),
        Dataset(x[q], y[q], np.arange(N_QUERY)),
    )


def _task(train):
    cfg = ml_collections.ConfigDict(
        dict(hidden=(HIDDEN,), steps=100, lr=1e-2, weight_decay=1e-2, seed=0)
    )
    x, y = jnp.asarray(train.x_NxF), jnp.asarray(train.y_N)
    params = jax.jit(lambda k: mlp.fit(cfg, k, x, y, jnp.ones(len(y)), CLASSES))(jax.random.key(0))
    graphdef, _ = mlp.abstract(cfg, train.x_NxF.shape[1], CLASSES)
    return ClassifierTask(
        graphdef=graphdef, params=params, train=train, num_classes=CLASSES, logits_fn=mlp.apply
    )


def _torch_model(torch, params):
    """nn.Sequential equal to our MLP; nnx kernels are (in, out), torch weights (out, in)."""
    p = nnx.to_pure_dict(params)
    first, head = p["layers"][0], p["head"]
    model = torch.nn.Sequential(
        torch.nn.Linear(*first["kernel"].shape),
        torch.nn.GELU(approximate="tanh"),  # jax.nn.gelu's default is the tanh form
        torch.nn.Linear(*head["kernel"].shape),
    )

    def t(a):
        return torch.tensor(np.asarray(a, np.float32))

    state = {
        "0.weight": t(first["kernel"]).T.contiguous(),
        "0.bias": t(first["bias"]),
        "2.weight": t(head["kernel"]).T.contiguous(),
        "2.bias": t(head["bias"]),
    }
    model.load_state_dict(state)
    return model.eval(), state


@pytest.mark.slow
def test_trak_matches_traker(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("trak")
    from trak import TRAKer
    from trak.projectors import NoOpProjector

    torch.manual_seed(0)
    train, query = _digits()
    task = _task(train)
    num_params = ravel_pytree(task.params)[0].shape[0]

    # Ours: no projection, one model, absolute ridge DAMPING.
    cfg = grad_methods.default_config("trak1", "classifier")
    cfg.update(dict(proj_dim=0, damping=DAMPING, num_models=1, chunk=32))
    trak1 = methods.get("trak1", "classifier")
    ours_QxN = trak1.score(task, trak1.fit(task, cfg), query, cfg)

    # The torch copy computes the same logits.
    model, state = _torch_model(torch, task.params)
    x_tr, y_tr = torch.tensor(train.x_NxF), torch.tensor(train.y_N, dtype=torch.long)
    x_q, y_q = torch.tensor(query.x_NxF), torch.tensor(query.y_N, dtype=torch.long)
    with torch.no_grad():
        np.testing.assert_allclose(
            model(x_tr).numpy(), np.asarray(task.logits(train.x_NxF)), rtol=1e-4, atol=1e-4
        )

    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=N_TRAIN,
        save_dir=str(tmp_path / "trak"),
        device="cpu",
        projector=NoOpProjector(device="cpu"),
        use_half_precision=False,
        lambda_reg=DAMPING / num_params,  # traker's features are divided by sqrt(P)
    )
    assert traker.proj_dim == num_params
    traker.load_checkpoint(state, model_id=0)
    traker.featurize(batch=(x_tr, y_tr), num_samples=N_TRAIN)
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="q", checkpoint=state, model_id=0, num_targets=N_QUERY)
    traker.score(batch=(x_q, y_q), num_samples=N_QUERY)
    theirs_QxN = np.asarray(traker.finalize_scores(exp_name="q"), np.float64).T

    assert theirs_QxN.shape == ours_QxN.shape == (N_QUERY, N_TRAIN)
    rho_Q = np.array([spearmanr(ours_QxN[q], theirs_QxN[q]).statistic for q in range(N_QUERY)])
    assert rho_Q.min() > 0.95, rho_Q
    # Equal up to traker's one positive scale (its mean-|inverse| normalisation).
    ours = ours_QxN.astype(np.float64).ravel()
    scale = ours @ theirs_QxN.ravel() / (theirs_QxN.ravel() @ theirs_QxN.ravel())
    assert scale > 0
    rel = np.linalg.norm(scale * theirs_QxN.ravel() - ours) / np.linalg.norm(ours)
    assert rel < 1e-3, (rel, rho_Q)
