"""Steering operators: what they compute, and (separately) where they attach.

What: a shared low-rank basis ``phi(h) = SiLU(W_down LN(h))`` (LayerNorm without affine
parameters) and, per subset k, a map from the r-dim basis to the output space:
``delta_k(h) = B_k phi(h)`` with ``B_k`` of shape (out_dim x r). ``B`` starts at zero, so
every operator starts as the identity (steered model == base model).

Where: a hook turns base-model activations into steered logits. ``LogitHook`` is the
paper's classifier variant: ``logits_k = logits + delta_k(h)`` with h the penultimate
features. ``HiddenHook`` (MLP classifiers) also steers the last hidden layer's
pre-activation, so that part of the shift goes through the network's own nonlinearity and
output layer (``HiddenSiteOperators``). A residual-stream hook (language models, in
``residual``) plays the same role for decoders.

Operators expose ``steered_logits(rows, subset_ids_K, shared, fixed)``: the steered logits of
operators ``subset_ids_K`` (all T when None) on cached rows, either one row set for all K
(``shared``; arrays B x ...) or one per operator (K x B x ...).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.errors import ConfigError
from stride_jax.stride import precision


def layer_norm_noaffine(h_BxD: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = h_BxD.mean(-1, keepdims=True)
    var = h_BxD.var(-1, keepdims=True)
    return (h_BxD - mean) * jax.lax.rsqrt(var + eps)


class SteeringOperators(nnx.Module):
    """T steering operators sharing one rank-r basis.

    Params: ``w_down`` (feat_dim x rank, LeCun-normal times ``init_scale``), ``gates``
    (T x out_dim x rank, zero-init). A small ``init_scale`` keeps SiLU in its near-linear range,
    so the basis starts as a random projection of LN(h). ``compute_dtype`` ("float32" or
    "bfloat16", ``precision``; set for the responses by ``with_compute_dtype``): how the two
    products (LN(h) W_down and B_k phi) run; they return float32 either way, and params, LN
    and SiLU stay float32.
    """

    def __init__(
        self,
        feat_dim: int,
        out_dim: int,
        rank: int,
        num_subsets: int,
        *,
        rngs,
        init_scale: float = 1.0,
        compute_dtype: str = "float32",
    ):
        precision.check(compute_dtype)
        self.compute_dtype = compute_dtype
        init = jax.nn.initializers.lecun_normal()
        w = init_scale * init(rngs.params(), (feat_dim, rank), jnp.float32)
        self.w_down = nnx.Param(w)
        self.gates = nnx.Param(jnp.zeros((num_subsets, out_dim, rank), jnp.float32))

    @classmethod
    def for_config(cls, key, feat_dim: int, out_dim: int, num_subsets: int, config):
        """Operators of a ``stage1`` config's rank and basis scale, initialised from ``key``."""
        return cls(
            feat_dim,
            out_dim,
            config.rank,
            num_subsets,
            rngs=nnx.Rngs(key),
            init_scale=config.basis_scale,
        )

    def basis(self, h_BxD: jax.Array) -> jax.Array:
        """phi_BxR = SiLU(LN(h) W_down)."""
        ln = layer_norm_noaffine(h_BxD)
        return jax.nn.silu(precision.matmul(ln, self.w_down[...], self.compute_dtype))

    def shifts(self, phi_BxR: jax.Array, subset_ids_K: jax.Array | None = None) -> jax.Array:
        """delta_KxBxO for the operators ``subset_ids_K`` (all T when None).

        Any leading batch shape works (e.g. phi_BxLxR for tokens gives delta_KxBxLxO).
        """
        gates = self.gates[...]
        if subset_ids_K is not None:
            gates = gates[subset_ids_K]
        return precision.einsum("kor,...r->k...o", gates, phi_BxR, self.compute_dtype)

    def shifts_per_row(self, phi_KxBxR: jax.Array, subset_ids_K: jax.Array | None) -> jax.Array:
        """delta_KxBxO where operator k sees its own batch phi_KxBxR[k] (any batch shape);
        ``subset_ids_K=None`` means all T operators in order (no gather of the gates)."""
        gates = self.gates[...]
        if subset_ids_K is not None:
            gates = gates[subset_ids_K]
        return precision.einsum("kor,k...r->k...o", gates, phi_KxBxR, self.compute_dtype)

    def gate_sq_norms(self, subset_ids_K: jax.Array | None = None) -> jax.Array:
        """||B_k||_F^2 of the operators ``subset_ids_K`` (all T when None): (K,)."""
        gates = self.gates[...]
        if subset_ids_K is not None:
            gates = gates[subset_ids_K]
        return (gates**2).sum((1, 2))

    @property
    def num_subsets(self) -> int:
        return self.gates[...].shape[0]

    def site_shift(self, phi, subset_ids_K, shared: bool) -> jax.Array:
        """delta_KxBxO of the operators on basis features B x R (shared) or K x B x R."""
        return self.shifts(phi, subset_ids_K) if shared else self.shifts_per_row(phi, subset_ids_K)

    def features(self, rows: dict, feat_key: str, phi_key: str) -> jax.Array:
        """This basis on ``rows[feat_key]``, or the precomputed ``rows[phi_key]`` when the rows
        carry it (``basis_rows``: a frozen basis evaluated once for all training rows)."""
        return rows[phi_key] if phi_key in rows else self.basis(rows[feat_key])

    def basis_rows(self, rows: dict) -> dict:
        """``{"phi": basis(h)}`` for cached rows: what ``steered_logits`` reads instead of
        recomputing the basis (valid while ``w_down`` does not change)."""
        return {"phi": self.basis(rows["h"])}

    def linear_sites(self, rows: dict, fixed=None) -> list:
        """``[(self, L_BxCxC, phi_BxR)]``: the steered logits are ``logits + B phi``, so their
        derivative in ``B[o, r]`` is ``L[o, :] phi[r]`` with L the identity (``newton``)."""
        del fixed
        phi = self.features(rows, "h", "phi")
        c = rows["logits"].shape[-1]
        eye = jnp.broadcast_to(jnp.eye(c, dtype=phi.dtype), (phi.shape[0], c, c))
        return [(self, eye, phi)]

    def logit_shift(self, rows: dict, subset_ids_K, shared: bool, fixed=None) -> jax.Array:
        """B_k phi(h): how far the operators move the logits (K x B x C)."""
        del fixed
        return self.site_shift(self.features(rows, "h", "phi"), subset_ids_K, shared)

    def steered_logits(self, rows: dict, subset_ids_K, shared: bool, fixed=None) -> jax.Array:
        """logits + B_k phi(h) on cached rows ``{"h", "logits"}`` (or ``"phi"``): K x B x C."""
        return rows["logits"] + self.logit_shift(rows, subset_ids_K, shared, fixed)


class HiddenSiteOperators(nnx.Module):
    """T operators at two sites of an MLP classifier, each site with its own shared basis:

    ``logits_k = logits + (act(a + U_k psi(u)) - act(a)) W_head + B_k phi(h)``

    with ``a`` the last hidden layer's pre-activation, ``u`` that layer's input, ``h = act(a)``
    and ``W_head`` the frozen output layer. ``hidden`` holds ``psi`` and the ``U_k`` (T x H x
    r_u), ``logit`` holds ``phi`` and the ``B_k``; both gates start at zero. Written as a
    difference, zero gates give the cached base logits exactly.
    """

    def __init__(self, dims: dict, rank_hidden: int, rank: int, num_subsets: int, *, rngs, **kw):
        self.hidden = SteeringOperators(
            dims["u"], dims["a"], rank_hidden, num_subsets, rngs=rngs, **kw
        )
        self.logit = SteeringOperators(
            dims["h"], dims["logits"], rank, num_subsets, rngs=rngs, **kw
        )

    @property
    def num_subsets(self) -> int:
        return self.logit.num_subsets

    def gate_sq_norms(self, subset_ids_K: jax.Array | None = None) -> jax.Array:
        return self.hidden.gate_sq_norms(subset_ids_K) + self.logit.gate_sq_norms(subset_ids_K)

    def basis_rows(self, rows: dict) -> dict:
        """Both bases on cached rows: ``{"psi": psi(u), "phi": phi(h)}``."""
        return {"psi": self.hidden.basis(rows["u"]), "phi": self.logit.basis(rows["h"])}

    def linear_sites(self, rows: dict, fixed) -> list:
        """Both sites' ``(module, L_BxOxC, features_BxR)`` at zero gates (``newton``): the
        hidden site's logits move by ``act'(a) * (U psi)`` through ``W_head``, so its L is
        ``diag(act'(a)) W_head``; the logit site's is the identity."""
        psi = self.hidden.features(rows, "u", "psi")
        a = rows["a"]
        slope = jax.jvp(jax.nn.gelu, (a,), (jnp.ones_like(a),))[1]
        l_hidden = slope[:, :, None] * fixed["w_head"][None]
        return [(self.hidden, l_hidden, psi), *self.logit.linear_sites(rows)]

    def steered_logits(self, rows: dict, subset_ids_K, shared: bool, fixed) -> jax.Array:
        """Steered logits K x B x C on cached rows ``{"u", "a", "h", "logits"}`` (``"psi"`` /
        ``"phi"`` replace ``u`` / ``h`` when present); ``fixed`` holds the frozen output layer
        ``{"w_head": H x C}``."""
        return rows["logits"] + self.logit_shift(rows, subset_ids_K, shared, fixed)

    def logit_shift(self, rows: dict, subset_ids_K, shared: bool, fixed) -> jax.Array:
        """The operators' change of the logits, K x B x C (``steered_logits`` minus the base
        logits, computed without them so that small shifts keep their precision)."""
        psi = self.hidden.features(rows, "u", "psi")
        da = self.hidden.site_shift(psi, subset_ids_K, shared)
        dh = jax.nn.gelu(rows["a"] + da) - jax.nn.gelu(rows["a"])
        dz = dh @ fixed["w_head"]
        return dz + self.logit.logit_shift(rows, subset_ids_K, shared)


def with_compute_dtype(graphdef, params, dtype: str):
    """The graphdef of operators (graphdef, params) whose ``SteeringOperators`` compute in
    ``dtype`` (``precision``); "float32" returns ``graphdef`` itself. Stage 1 trains in
    float32, the responses may run in bfloat16 (``sites``)."""
    precision.check(dtype)
    if dtype == "float32":
        return graphdef
    ops = nnx.merge(graphdef, params)
    for _, module in nnx.iter_modules(ops):
        if isinstance(module, SteeringOperators):
            module.compute_dtype = dtype
    return nnx.split(ops, nnx.Param)[0]


def whitened_basis(u_NxD, rank: int, scale: float, whiten: bool = True) -> jax.Array:
    """A data-dependent ``w_down`` (D x rank): the top principal directions of LN(u), scaled
    so that each basis feature has standard deviation ``scale`` over the rows (small: SiLU's
    near-linear range). ``whiten=False`` keeps the directions' own spread instead (feature j's
    standard deviation is ``scale * sqrt(lambda_j / mean(lambda))``), so that low-variance
    directions stay small and a uniform gate damping penalises them more. Refuses a rank
    above D."""
    u = layer_norm_noaffine(jnp.asarray(u_NxD, jnp.float32))
    d = u.shape[1]
    if rank > d:
        raise ConfigError(f"basis rank {rank} exceeds the hooked feature dimension {d}")
    centred = u - u.mean(0)
    cov = (centred.T @ centred) / max(u.shape[0] - 1, 1)
    evals, evecs = np.linalg.eigh(np.asarray(cov, np.float64))
    top = np.argsort(evals)[::-1][:rank]
    spread = np.maximum(evals[top], 1e-12) if whiten else np.maximum(evals[top].mean(), 1e-12)
    w = evecs[:, top] / np.sqrt(spread)
    return jnp.asarray(scale * w, jnp.float32)


@dataclasses.dataclass(frozen=True)
class LogitHook:
    """Attach operators to a classifier's logits; activations are cached once.

    ``encode`` runs the frozen base model: ``{"h": features_BxD, "logits": logits_BxC}``.
    """

    features_fn: callable
    logits_fn: callable
    fixed = None

    def encode(self, x_BxF: jax.Array) -> dict[str, jax.Array]:
        return {"h": self.features_fn(x_BxF), "logits": self.logits_fn(x_BxF)}

    @staticmethod
    def make_operators(key, cache, num_subsets: int, config) -> SteeringOperators:
        """Operators for cached activations ``cache`` and a ``stage1`` config."""
        dim, out = cache["h"].shape[-1], cache["logits"].shape[-1]
        return SteeringOperators.for_config(key, dim, out, num_subsets, config)

    @staticmethod
    def steered_logits(cache: dict[str, jax.Array], delta_KxBxO: jax.Array) -> jax.Array:
        """logits_KxBxC = base logits + shift (cache arrays broadcast over K)."""
        return cache["logits"] + delta_KxBxO


HIDDEN_BASES = ("whitened", "pca")


@dataclasses.dataclass(frozen=True)
class HiddenHook:
    """Attach ``HiddenSiteOperators`` to an MLP: ``encode_fn(x)`` returns the cached rows
    ``{"u", "a", "h", "logits"}`` and ``fixed = {"w_head": H x C}`` is the output layer.

    The hidden site's basis starts as the whitened top-``rank_hidden`` principal directions of
    the training rows' LN(u) (``whitened_basis``); the logit site's is random, as in LogitHook.
    """

    encode_fn: callable
    fixed: dict
    rank_hidden: int
    basis: str = "whitened"  # or "pca": principal directions, not whitened

    def encode(self, x_BxF: jax.Array) -> dict[str, jax.Array]:
        return self.encode_fn(x_BxF)

    def make_operators(self, key, cache, num_subsets: int, config) -> HiddenSiteOperators:
        dims = {k: cache[k].shape[-1] for k in ("u", "a", "h", "logits")}
        ops = HiddenSiteOperators(
            dims,
            self.rank_hidden,
            config.rank,
            num_subsets,
            rngs=nnx.Rngs(key),
            init_scale=config.basis_scale,
        )
        if self.basis not in HIDDEN_BASES:
            raise ConfigError(f"hidden basis must be one of {HIDDEN_BASES}, got {self.basis!r}")
        ops.hidden.w_down[...] = whitened_basis(
            cache["u"], self.rank_hidden, config.basis_scale, whiten=self.basis == "whitened"
        )
        return ops
