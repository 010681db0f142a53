"""STRIDE's config block (``config.stride``) and its defaults per task kind.

The ``stage1`` block is the Adam recipe below (zero-gate start, 200 steps; chosen on
validation digits), from which the decoder defaults start; classifiers apply
``NEWTON_RECIPE`` on top (one Gauss-Newton step, ``stride.newton``). The Adam recipe trains
every operator at every step (``subsets_per_step=0``) on all its members, with one shared
stability batch, a small fidelity weight and an L2 penalty on the gates: each operator then
sits near the optimum of "a small step towards its subset, held back by the KL to the base
model", where its loss drops add up over examples (README, "How STRIDE is trained").
"""

from __future__ import annotations

import dataclasses

import ml_collections

from stride_jax.errors import ConfigError
from stride_jax.stride import recover

# The stage-1 settings, grouped by what they control.
OPERATORS = dict(rank=256, basis_scale=0.1, init="zero", basis="random")
# The Gauss-Newton start on decoders: sampled label sequences per row for the true Fisher, and
# decoder rows per curvature chunk (0: 16; classifiers always take 256).
NEWTON = dict(fisher_samples=1, curvature_batch=0)
SCHEDULE = dict(steps=200, log_every=50, ckpt_every=100, warmup_steps=50)
OPTIMIZER = dict(lr=1e-2, lr_muon=0.0, lr_end_frac=0.05, weight_decay=0.0)
BATCHES = dict(
    subsets_per_step=0, fidelity_rows="all", fidelity_batch=16, stability_rows="shared"
) | dict(stability_batch=128, probe_batch=64, top_k=10)
LINEARITY = dict(sketch="features", sketch_dim=32, ridge=1.0, intercept=True) | dict(
    probe_mask_members=False, linearity_over_all=True
)
WEIGHTS = dict(w_fidelity=1e-2, w_stability=1.0, w_linearity=0.1, gate_l2=1e-4)

# The classifier recipe (chosen on validation digits and MNIST-5k, experiments/RESULTS.md):
# stage 1 as one damped Gauss-Newton step with a light fidelity weight, no Adam steps after.
NEWTON_RECIPE = dict(init="newton", steps=0, w_fidelity=3e-4, gate_l2=6e-5)

# The decoder recipe (chosen on the 100 validation blocks of lm_shakespeare, see ``decoder``).
DECODER_STAGE1 = (
    dict(rank=16, basis_scale=1.0, top_k=16, sketch_dim=16)
    | dict(steps=600, log_every=50, ckpt_every=300, warmup_steps=30)
    | dict(lr=1e-2, lr_muon=0.02, lr_end_frac=0.1, subsets_per_step=32)
    | dict(fidelity_rows="sample", fidelity_batch=10, stability_rows="per_subset")
    | dict(stability_batch=4, probe_batch=4, linearity_over_all=False)
    | dict(w_fidelity=1.0, w_linearity=1.0, gate_l2=0.0)
)

# The decoder recipe (the default since 2026-12-03; experiments/RESULTS.md, "Gauss-Newton
# stage 1 on language models"): stage 1 in closed form through the upper blocks with the
# sampled true Fisher, a random rank-64 basis, first-order ("linear") responses. Chosen on the
# 100 validation blocks of lm_shakespeare among 33 STRIDE points: LDS 0.241 at T = N against
# 0.178 at T = N/2 and 0.129 for the Adam recipe (``decoder_adam``), in ~30 s instead of
# ~1,300 s.
DECODER_NEWTON_STAGE1 = dict(init="newton", steps=0, lr_muon=0.0, subsets_per_step=0)
DECODER_NEWTON_STAGE1 |= dict(rank=64, w_fidelity=1e-2, gate_l2=1e-3, fisher_samples=1)


# ``hook="kernels"`` (``stride.kernels``): the dense kernels the operators steer. ``layers``: a
# decoder's last blocks whose MLPs are steered (0: automatic, every block when the T x P subset
# gradients fit in memory, else as many of the last as fit); ``params_filter``: a regex over
# parameter paths that narrows them (as the gradient baselines' key); ``rank``: each operator
# reads the top-rank principal directions of each kernel's input (0: all of them).
KERNELS = dict(layers=0, params_filter="", rank=0, fisher="true", curvature="ekfac")


# ``design.num_subsets = 0`` means automatic, at least d and capped:
# - classifier: T = min(3000, N*d // 2), the tuned T on digits (N=1,400, d=5 gives 3,000); the
#   mean subset holds at least 2 rows and none is empty;
# - decoder: T = min(8192, N): on validation Shakespeare T = N (0.241) beat N/2 (0.178) and
#   N/4 (0.112); the Gauss-Newton stage 1 and the linear responses cost little more per
#   operator. Above the cap (N > 8,192) the design is compressive (T < N).
AUTO_SUBSETS_CAP = {"classifier": 3000, "decoder": 8192}
AUTO_MIN_MEAN_SIZE = 2
AUTO_RULE = {"classifier": "min(3000, N*d/2)", "decoder": "min(8192, N)"}


def auto_num_subsets(n: int, degree: int, kind: str = "classifier") -> int:
    """The automatic T for n training rows and degree d (see ``AUTO_RULE``)."""
    per_kind = n * degree // AUTO_MIN_MEAN_SIZE if kind == "classifier" else n
    return max(degree, min(AUTO_SUBSETS_CAP[kind], per_kind))


def stage1_defaults(**overrides) -> dict:
    """The ``stage1`` block (the Adam recipe); ``overrides`` replace keys, unknown ones are
    refused."""
    out = OPERATORS | NEWTON | SCHEDULE | OPTIMIZER | BATCHES | LINEARITY | WEIGHTS
    unknown = set(overrides) - set(out)
    if unknown:
        raise ConfigError(f"unknown stage1 keys {sorted(unknown)}")
    return out | overrides


def lasso_defaults(**overrides) -> dict:
    """The ``lasso`` block of a STRIDE config: ``recover.LassoConfig`` with a 6-point path of
    25 FISTA steps each down to 0.01 lambda_max. On the validation queries (responses of the
    default operators): digits 0.6807 vs 0.6809 for 4 points x 100 steps (which matched
    8 x 500 to 4 digits), MNIST-5k 0.6491 vs 0.6465, at 0.5x / 0.4x of the time; 4 x 25 equals
    4 x 100 on both; lam_frac 0.003 / 0.01 / 0.05 gave 0.652 / 0.653 / 0.637 on digits."""
    base = dict(path_len=6, maxiter=25, lam_frac=0.01)
    return dataclasses.asdict(recover.LassoConfig(**(base | overrides)))


def classifier() -> ml_collections.ConfigDict:
    """Chosen on validation digits and MNIST-5k (experiments/RESULTS.md): the logit site, one
    damped Gauss-Newton step for all T=3000 operators, a size-weighted Lasso."""
    return ml_collections.ConfigDict(
        dict(
            seed=3,
            compute_dtype="float32",  # or "bfloat16": the responses' products (precision.py)
            response_batch=64,
            responses="forward",  # or "linear": first-order responses from query gradients
            # Multiply each subset's responses by its size before the Lasso: the fidelity loss
            # is a mean over members, so an operator answers to the average of its members.
            size_weighted=True,
            hook="logits",  # or "hidden", or "kernels" (operators on every dense kernel)
            kernels=dict(KERNELS),
            lasso_compressed=dict(),  # Lasso settings over ``lasso`` when T < N (none here)
            # "lasso" / "kernel" / "solve" / "auto": the kernel recovery at T < N, the Lasso
            # at T >= N (forward responses are not exactly linear: no exact solve)
            recovery="auto",
            recovery_jitter=1e-4,  # recovery="kernel": ridge on A R, times its mean diagonal
            hidden_rank=64,
            hidden_basis="whitened",  # hook="hidden": "whitened" or "pca" directions
            design=dict(kind="expander", num_subsets=0, degree=5, seed=2),  # 0: automatic T
            stage1=stage1_defaults(**NEWTON_RECIPE),
            lasso=lasso_defaults(lam_frac=0.003),
        )
    )


def decoder() -> ml_collections.ConfigDict:
    """The decoder default (since 2026-12-04): kernel operators (``hook="kernels"``,
    ``stride.kernels``) on every MLP kernel, their Gauss-Newton step with EK-FAC curvature
    from the empirical Fisher (the data's labels: one backward pass per chunk gives the
    curvature and the subset sums), linear responses, ``design.kind="auto"`` (at T >= N the
    full-rank ``subsets.interleaved``, below it the expander) and ``recovery="auto"`` (at
    T >= N the exact solve of A b = y, at T < N the kernel recovery: ``posterior``). Chosen
    on the validation queries of lm_shakespeare (100 blocks) and chit-chat SFT, two-seed
    ground truth (experiments/RESULTS.md): Shakespeare 0.390 against 0.319 for the
    residual-stream recipe (``decoder_residual``) and 0.393 for EK-FAC; SFT 0.524 (the true
    Fisher 0.511). The Lasso (``recovery="lasso"``) keeps its settings for T >= N: the
    responses are linear, so a smaller lambda only removes shrinkage (lam_frac 0.02 / 0.005
    / 0.001 / 1e-4 gave 0.373 / 0.384 / 0.387 / 0.388 with a 6-point path of 50 steps; 3e-5,
    a 2-point path of 150 steps each).

    The gates hold T x P floats, P the steered kernels' parameters (65,536 on lm_shakespeare's
    two MLPs; 2.7 million per block on SmolLM2-135M): on wide models narrow ``kernels.layers``
    or use ``decoder_residual`` (P = d_model x rank)."""
    cfg = decoder_residual()
    cfg.hook = "kernels"
    cfg.kernels.fisher = "empirical"
    cfg.lasso.update(lam_frac=3e-5, path_len=2, maxiter=150)
    # At T < N (a compressive design: N above the automatic T's cap, or T set lower) the
    # Lasso has to select: validation at T = N/2 scored 0.316 (Shakespeare) / 0.463 (SFT) with
    # lam_frac 1e-3 on a 6-point path of 50 steps, 0.291 / 0.402 with the T = N settings.
    cfg.lasso_compressed = dict(lam_frac=1e-3, path_len=6, maxiter=50)
    # At T < N, ``recovery="auto"`` decodes the responses through the training rows' own
    # (``posterior``): on validation 0.364 / 0.498 at T = N/2 (Shakespeare / SFT) and 0.316 /
    # 0.441 at N/4, against the Lasso's 0.313 / 0.463 and 0.233 / 0.378. lasso_compressed
    # applies to recovery="lasso" at T < N. At T >= N it is the exact solve of A b = y
    # (linear responses determine every row), on an interleaved design (``design.kind``
    # "auto": interleaved at T >= N, the expander below): the expander's consecutive layout
    # has rank N - 4 at T = N (blocks of rows that meet every subset once), the interleaved
    # one full rank. Validation at T = N, Shakespeare / SFT: 0.3947 / 0.5250 against the
    # expander's Lasso 0.3931 / 0.5250 and exact solve 0.3939 / 0.5244. Below N the layouts
    # tie or the expander leads (design seeds 2-6, interleaved minus expander: N/2 -0.0005 /
    # +0.0017, N/4 -0.0047 / -0.0040; experiments/RESULTS.md, session 13).
    cfg.design.kind = "auto"
    return cfg


def decoder_residual() -> ml_collections.ConfigDict:
    """The residual-stream recipe (the decoder default from 2026-12-03 to 2026-12-04):
    ``decoder_adam()`` with the Gauss-Newton step through the upper blocks
    (``DECODER_NEWTON_STAGE1``), linear responses, Lasso lam_frac 0.02 with 50 steps. Its
    gates hold d_model x rank floats per operator, so it scales to wide models."""
    cfg = decoder_adam()
    cfg.stage1.update(DECODER_NEWTON_STAGE1)
    cfg.update(responses="linear")
    # 50 FISTA steps per path point: validation LDS 0.2409 as with 500, in 17 s instead of 123.
    cfg.lasso.update(lam_frac=0.02, maxiter=50)
    return cfg


def decoder_adam() -> ml_collections.ConfigDict:
    """The decoder's Adam recipe (the default until 2026-12-03); ``layer=-1`` means round(2/3
    of the depth).

    Stage 1 (600 steps, 10 member rows per subset) was chosen on the 100 validation blocks of
    lm_shakespeare (``experiments/tune_lm.py``): LDS 0.129 against 0.092 for 300 steps of 4
    rows; hook layer 0 / 1 / 2 gave -0.001 / 0.092 / 0.091, stability weight 10 gave 0.083,
    Lasso lam_frac 0.01 / 0.05 / 0.2 gave 0.095 / 0.092 / 0.097.
    """
    return ml_collections.ConfigDict(
        dict(
            seed=3,
            compute_dtype="float32",  # or "bfloat16": the responses' products (precision.py)
            remat=False,  # checkpoint the blocks above the hook in stage 1's gradient
            hook="residual",  # or "kernels": operators on the MLPs' dense kernels
            kernels=dict(KERNELS),
            lasso_compressed=dict(),  # Lasso settings over ``lasso`` when T < N (none here)
            recovery="auto",  # "lasso" / "kernel" / "solve" / "auto" (posterior.py): Adam: Lasso
            recovery_jitter=1e-4,  # recovery="kernel": ridge on A R, times its mean diagonal
            layer=-1,
            vocab_chunk=8192,
            encode_batch=16,
            op_chunk=64,
            query_batch=1,
            size_weighted=False,  # multiply each subset's responses by its size (classifier)
            responses="forward",  # or "linear": first-order responses from query gradients
            design=dict(kind="expander", num_subsets=0, degree=5, seed=2),  # 0: automatic T
            stage1=stage1_defaults(**DECODER_STAGE1),
            lasso=lasso_defaults() | dict(lam_frac=0.05, maxiter=500),
        )
    )


def default(kind: str) -> ml_collections.ConfigDict:
    """The ``stride`` block for a task kind ("classifier" or "decoder")."""
    return classifier() if kind == "classifier" else decoder()


# The paper's recipe on decoders: ``decoder_adam`` (the paper's structure: a learned basis,
# sampled subsets per step with per-subset fidelity / stability / probe batches, all three
# losses) plus the classifier work's gate damping. Its other fixes (every operator at every
# step on all members, a small fidelity weight) are left out on decoders: on lm_shakespeare at
# T = 500 the unchunked all-operator step asked for 115 GB, and a chunked one costs T / 32 =
# 16 times the sampled step (600 steps: hours on 2 CPU cores); a small fidelity weight only
# pays off when every operator is visited at every step (RESULTS.md, classifiers).
PAPER_DECODER = dict(gate_l2=1e-4)


def paper(kind: str) -> ml_collections.ConfigDict:
    """The paper's recipe (STRIDE.txt, section 4 and appendix F), reproduced as far as it is
    affordable: operators trained by Adam with all three losses (fidelity, top-K KL
    stability, linearity), a learned shared basis, forward responses of the steered model, a
    Lasso over the expander design. The paper relies on T < N (compressive sensing):
    ``design.num_subsets=0`` takes the automatic T, so a run comparing against the paper sets T
    itself (the LM configs use N/4).

    Decoder: ``decoder_adam`` (rank 16, 600 steps of 32 sampled subsets, hook at 2/3 of the
    depth) with ``PAPER_DECODER``. Classifier: the logit site with the Adam stage 1
    (``stage1_defaults``: 200 steps from zero gates, every operator at every step, a small
    fidelity weight, gate damping) instead of the Gauss-Newton step."""
    if kind == "classifier":
        cfg = classifier()
        cfg.stage1 = stage1_defaults()
        return cfg
    cfg = decoder_adam()
    cfg.stage1.update(PAPER_DECODER)
    return cfg


PRESETS = {
    "default": default,
    "residual": lambda kind: decoder_residual(),
    "adam": lambda kind: decoder_adam(),
    "paper": paper,
}


def preset(name: str, kind: str) -> ml_collections.ConfigDict:
    """A named STRIDE recipe for a task kind (``PRESETS``): "default" (``default``),
    "residual" (the decoder's residual-stream recipe, ``decoder_residual``), "adam" (the
    decoder's Adam recipe, ``decoder_adam``) or "paper" (``paper``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown STRIDE preset {name!r}; known: {sorted(PRESETS)}")
    if name in ("adam", "residual") and kind != "decoder":
        raise ConfigError(f"STRIDE preset {name!r} is a decoder recipe; use 'paper'")
    return PRESETS[name](kind)
