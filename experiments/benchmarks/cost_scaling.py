"""Cost scaling of STRIDE and three baselines on a real decoder (issue 15, item 6).

    python -m experiments.benchmarks.cost_scaling --workdir=runs/cost_scaling           # SmolLM2
    python -m experiments.benchmarks.cost_scaling --workdir=DIR --model=small \\
        --n_train=24,48 --n_query=4 --time_cap_s=120                                    # smoke

SmolLM2-135M-Instruct (the GGUF ``experiments.fetch_smollm2`` puts in runs/models/smollm2,
dequantised by ``gguf_import.load_gguf``; its tokenizer from the same file) on chit-chat SFT
pairs (``data.corpora.chitchat_records``: prompt = one turn, response = the next, loss on the
response), each pair tokenized as the project does (``data.text.tokenize``) and truncated to
its first ``--max_len`` tokens (one row per pair, padded to ``--max_len``). The first N pairs
of one seeded permutation are the training rows, for N in ``--n_train``; its last
``--n_query`` pairs are the queries.
``--model=small`` is a random decoder of a tiny SmolLM2-like shape (Llama family, 6 layers,
character tokenizer) for smoke tests.

Per (method, N) cell, in its own process (so its memory is its own, and it can be killed):
setup (imports, model, rows, the task; not counted), then ``fit`` and ``score`` of the method
as the registry gives them (``methods.get(name, "decoder")``), each ending in
``profiling.block_all``. The cell's clock starts when setup is done; at ``--time_cap_s``
seconds of fit + score the process group is killed and the cell is recorded as ``capped``,
with the phases it finished and how far it got. Peak RSS is the process's high-water mark
(``VmHWM``, read by the parent while the cell runs and by the cell itself), so it includes
the model and the rows; ``fit_rss_mb`` / ``score_rss_mb`` are the increases inside each block
(``profiling.PeakMemory``). Throughput: training rows per second of fit (compile included); a
capped cell reports the throughput of its method's largest finished cell and the fit time
that projects to, and (capped in fit) the measured upper bound N / (seconds it ran). After a
capped cell the method's larger N are skipped (``--run_after_cap`` runs them anyway): at the
same throughput they would be capped too.

Methods (each its default decoder config, except as said):
- ``stride``: the residual-stream recipe ``stride.defaults.decoder_residual()`` (the decoder
  default until the kernel operators, which on SmolLM2 would hold T x 2.7 million gate floats
  per steered block; the Gauss-Newton recipe: stage 1 as one Gauss-Newton step through the
  blocks above
  the hook, sampled true Fisher, linearised responses; T = min(8192, N)), hook ``layer=-1``
  = round(2/3 depth). Its Gauss-Newton solve factors a dense P x P curvature of the
  P = d_model x rank gate parameters of one operator; the library refuses P >
  ``sites.MAX_NEWTON_PARAMS``, so the rank is lowered to the largest it allows on the model
  (28 on SmolLM2's d_model 576, instead of the recipe's 64), or set with ``--stride_rank``.
- ``stride_forward``: the same with ``responses="forward"`` (every operator run forward
  through the upper blocks per query); not in the default list.
- ``stride_kernels``: the decoder default, kernel operators (``stride.defaults.decoder()``:
  closed-form Gauss-Newton gates on the MLP kernels, EK-FAC curvature, empirical Fisher,
  T = min(8192, N)), on the last block's three MLP kernels (``kernels.layers=1``), each
  operator reading the top ``KERNEL_RANK`` input directions of each kernel
  (``kernels.rank``): T x 233,472 gate floats on SmolLM2 instead of T x 2.65M; not in the
  default list.
- ``ekfac_last``: EK-FAC on the same three kernels (``layers=1``), its default damping, the
  empirical Fisher as STRIDE's; not in the default list.
- ``ekfac``: ``layers`` = the model's depth (every MLP's kernels), ``fisher="sampled"`` (one
  label per token drawn from the model: the Monte-Carlo true Fisher; a decoder refuses
  ``"true"``, the exact expectation over the vocabulary).
- ``trak1``: TRAK with the base model alone (projection 2048 of the last MLP's gradients).
- ``logra``: LoGRA (16 x 16 projections of the last MLP's three kernels).

The JSON (``DIR/cost_scaling.json``) also records the parameters each method differentiates
(STRIDE: the parameters above its hook, which its stage 1 and responses run through, and its
operators' gate parameters) and the machine. ``--noisolate`` runs the cells in this process
(no cap). ``--mem_limit_gb`` bounds each cell's memory (``RLIMIT_DATA``: an allocation beyond
it fails, or the process crashes; recorded as ``failed``) so that one cell cannot exhaust a
shared machine; a failed cell's method skips its larger N too. ``--append`` keeps the cells of
the methods not run now from an earlier run in the same ``--workdir``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback

import jax
import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEIGHTS = os.path.join(ROOT, "runs/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
METHODS = ("stride", "ekfac", "trak1", "logra")
KNOWN = METHODS + ("stride_forward", "stride_kernels", "ekfac_last")
KERNEL_RANK = 64  # stride_kernels: input directions per steered kernel (kernels.rank)
# The "small" model: SmolLM2's family (Llama, grouped-query attention, SwiGLU, tied head),
# tiny; its vocabulary is the character tokenizer's.
SMALL = dict(family="llama", d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=64)
POLL_S = 0.5
SETUP_TIMEOUT_S = 600.0  # imports + model + rows, before a cell's clock starts


# --- data and model -------------------------------------------------------------------------


def first_rows(blocks):
    """Each example's first row (a pair longer than the block is truncated to its first
    block)."""
    _, first = np.unique(blocks.example_id_N, return_index=True)
    return blocks.subset(np.sort(first))


def prepare_data(model: str, n_max: int, n_query: int, max_len: int, weights: str, path: str):
    """Tokenized chit-chat rows (the first ``n_max`` training pairs and ``n_query`` queries)
    saved to ``path`` (npz); returns what they are."""
    from stride_jax.data import corpora

    # One seeded permutation: the training rows are its first n_max pairs, the queries its last
    # n_query (the same queries whatever --n_train is).
    records = corpora.chitchat_records()
    whole = corpora.split_records(records, len(records) - n_query, 0, n_query, seed=0)
    splits = corpora.RecordSplits(whole.train[:n_max], (), whole.query)
    if model == "smollm2":
        from stride_jax.data.tokenizer import load_tokenizer

        tokenizer, tok_name = load_tokenizer(weights), f"GGUF tokenizer of {weights}"
    else:
        tokenizer, tok_name = "char", "characters of the split's text"
    text = corpora.tokenize_splits("chitchat", splits, tokenizer, max_len)
    train, query = first_rows(text.train), first_rows(text.query)
    arrays = {}
    for name, rows in (("train", train), ("query", query)):
        for field in ("tokens_NxL", "loss_mask_NxL", "attn_mask_NxL"):
            arrays[f"{name}_{field}"] = getattr(rows, field)
    np.savez(path, **arrays)
    lengths = train.attn_mask_NxL.sum(1)
    info = dict(
        data="chit-chat SFT pairs (chitchat_dataset; prompt turn -> response turn, loss on the "
        "response), seed-0 permutation: training rows its first pairs, queries its last, each "
        "pair's first max_len tokens (rows padded to max_len)",
        tokenizer=tok_name,
        vocab_size=int(text.tokenizer.vocab_size),
        n_train=len(train),
        n_query=len(query),
        max_len=max_len,
        train_tokens_mean=float(lengths.mean()),
        train_tokens_max=int(lengths.max()),
        train_truncated_frac=float((lengths == max_len).mean()),
        response_tokens_mean=float(train.loss_mask_NxL.sum(1).mean()),
    )
    return info


def load_rows(path: str, name: str, n: int | None = None):
    from stride_jax.data import TokenBlocks

    with np.load(path) as z:
        tokens, loss, attn = (
            z[f"{name}_{f}"] for f in ("tokens_NxL", "loss_mask_NxL", "attn_mask_NxL")
        )
    n = len(tokens) if n is None else n
    if n > len(tokens):
        raise ValueError(f"{n} {name} rows asked for, {len(tokens)} prepared")
    keys = tuple(f"{name}{i}" for i in range(n))
    return TokenBlocks(tokens[:n], loss[:n], attn[:n], np.arange(n), keys)


def load_model(model: str, weights: str, vocab_size: int, max_len: int):
    """(DecoderConfig, graphdef, params, source)."""
    if model == "smollm2":
        from stride_jax.models import gguf_import

        cfg, gd, params = gguf_import.load_gguf(weights)
        return cfg, gd, params, f"SmolLM2-135M-Instruct, {weights} (GGUF Q4_1, dequantised)"
    from stride_jax.models import transformer

    cfg = transformer.DecoderConfig(**SMALL, vocab_size=vocab_size, max_len=max_len)
    gd, params = transformer.build(cfg, jax.random.key(0))
    return cfg, gd, params, f"random init of a small SmolLM2-like shape {SMALL}"


# --- methods ----------------------------------------------------------------------------------


def method_config(name: str, model_config, stride_rank: int = 0):
    """(registry name, config) of a benchmark method. STRIDE's rank: ``stride_rank``, else the
    recipe's, lowered to the largest the library's Gauss-Newton limit allows on this model
    (``sites.MAX_NEWTON_PARAMS`` gate parameters per operator, where the library has one)."""
    from stride_jax import methods
    from stride_jax.stride import defaults, sites

    if name in ("stride", "stride_forward"):
        cfg = defaults.decoder_residual()
        if name == "stride_forward":
            cfg.responses = "forward"
        limit = getattr(sites, "MAX_NEWTON_PARAMS", None)
        if stride_rank:
            cfg.stage1.rank = int(stride_rank)
        elif limit and cfg.stage1.rank * model_config.d_model > limit:
            cfg.stage1.rank = limit // model_config.d_model
        return "stride", cfg
    if name == "stride_kernels":
        cfg = defaults.decoder()
        cfg.kernels.update(layers=1, rank=KERNEL_RANK)
        return "stride", cfg
    reg = "ekfac" if name == "ekfac_last" else name
    cfg = methods.get(reg, "decoder").default_config("decoder")
    if name == "ekfac":
        cfg.update(layers=model_config.n_layers, fisher="sampled")
    if name == "ekfac_last":
        cfg.update(layers=1, fisher="empirical")
    return reg, cfg


def differentiated(name: str, task, cfg, n_train: int) -> dict:
    """What the method differentiates / runs through, in parameters."""
    from stride_jax.func import grads
    from stride_jax.stride import defaults, sites
    from stride_jax.stride import method as stride_method

    mc = task.model_config
    if name == "stride_kernels":
        from stride_jax.stride import kernels

        site = kernels.kernel_site(task, cfg)
        t = stride_method.resolve_num_subsets(cfg.design, n_train, "decoder")
        p = kernels.gate_params(site)
        names = tuple(x + "/kernel" for x in site.layers)
        return dict(
            params_differentiated=grads.num_params(task.params, names),
            what=f"the {len(site.layers)} MLP kernels of the last block, each operator on "
            f"their top {cfg.kernels.rank} input directions",
            layers=1,
            num_subsets=t,
            rank=int(cfg.kernels.rank),
            gate_params_per_operator=p,
            operator_params=t * p,
        )
    if name.startswith("stride"):
        layer = sites.hook_layer(cfg, mc.n_layers)
        # blocks >= layer, the final norm and the embedding (the tied head)
        above = [p for p in _paths(task.params) if _block(p) is None or _block(p) >= layer]
        n_above = grads.num_params(task.params, tuple(above))
        t = stride_method.resolve_num_subsets(cfg.design, n_train, "decoder")
        rank = int(cfg.stage1.rank)
        return dict(
            recipe_rank=int(defaults.decoder_residual().stage1.rank),
            hook_layer=layer,
            upper_blocks=mc.n_layers - layer,
            params_above_hook=n_above,
            what="blocks above the hook, final norm and the (tied) head: stage 1's curvature "
            "and the responses run through them",
            num_subsets=t,
            rank=rank,
            gate_params_per_operator=rank * mc.d_model,
            operator_params=t * rank * mc.d_model,
        )
    names = task.param_names(cfg)
    out = dict(params_differentiated=grads.num_params(task.params, names), layers=int(cfg.layers))
    if name in ("ekfac", "ekfac_last"):
        which = "(all of them)" if name == "ekfac" else "(STRIDE's kernel operators' layers)"
        out["what"] = f"every MLP kernel of the last {cfg.layers} blocks {which}"
        out["fisher"] = cfg.fisher
    elif name == "trak1":
        out["what"] = f"the MLP of the last {cfg.layers} block(s), projected to {cfg.proj_dim}"
        out["proj_dim"] = int(cfg.proj_dim)
    elif name == "logra":
        dense = task.dense_layers(cfg)
        out["what"] = (
            f"the {len(dense)} MLP kernels of the last {cfg.layers} block(s), each projected "
            f"{cfg.rank_in} x {cfg.rank_out}"
        )
        out["features"] = len(dense) * int(cfg.rank_in) * int(cfg.rank_out)
    return out


def _paths(params) -> list[str]:
    from stride_jax.task import all_param_names

    return list(all_param_names(params))


def _block(path: str) -> int | None:
    parts = path.split("/")
    if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return None


# --- one cell ---------------------------------------------------------------------------------


def _vmhwm_mb(pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Progress:
    """The cell's record, rewritten atomically after each phase (a killed cell keeps it)."""

    def __init__(self, path: str | None):
        self.path, self.entry = path, dict(phase="starting", t_start=time.time())

    def save(self, **kw) -> None:
        self.entry.update(kw)
        self.entry["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.path:
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.entry, f, indent=1)
            os.replace(self.path + ".tmp", self.path)


def run_cell(name: str, n: int, env: dict, path: str | None = None) -> dict:
    """Setup, fit, score of method ``name`` on the first n training rows (this process)."""
    prog = Progress(path)
    try:
        return _run_cell(name, n, env, prog)
    except Exception as e:
        prog.save(error=f"{type(e).__name__}: {str(e)[:600]}")
        raise


def _run_cell(name: str, n: int, env: dict, prog: Progress) -> dict:
    from stride_jax import methods, profiling, tasks

    t0 = time.perf_counter()
    train = load_rows(env["data"], "train", n)
    query = load_rows(env["data"], "query")
    cfg_m, gd, params, source = load_model(
        env["model"], env["weights"], env["vocab_size"], env["max_len"]
    )
    task = tasks.decoder((gd, params), train=train, queries=query)
    reg_name, cfg = method_config(name, cfg_m, env.get("stride_rank", 0))
    method = methods.get(reg_name, "decoder")
    mc = cfg_m
    model_info = dict(source=source, params=int(sum(x.size for x in jax.tree.leaves(params))))
    model_info |= dict(n_layers=mc.n_layers, d_model=mc.d_model, d_ff=mc.d_ff)
    model_info |= dict(vocab_size=mc.vocab_size)
    prog.save(
        model_info=model_info,
        phase="setup_done",
        t_clock=time.time(),
        setup_s=time.perf_counter() - t0,
        config=cfg.to_dict(),
        params=differentiated(name, task, cfg, n),
    )
    with profiling.PeakMemory() as pm:
        t1 = time.perf_counter()
        state = profiling.block_all(method.fit(task, cfg))
        fit_s = time.perf_counter() - t1
    prog.save(phase="fit_done", fit_s=fit_s, fit_rss_mb=pm.peak_mb)
    with profiling.PeakMemory() as pm:
        t1 = time.perf_counter()
        scores = np.asarray(profiling.block_all(method.score(task, state, query, cfg)))
        score_s = time.perf_counter() - t1
    prog.save(
        phase="done",
        score_s=score_s,
        score_rss_mb=pm.peak_mb,
        scores_shape=list(scores.shape),
        scores_finite=bool(np.isfinite(scores).all()),
    )
    if hasattr(state, "seconds"):  # STRIDE's own split (stage 1, responses, Lasso)
        prog.save(stride_seconds={k: float(v) for k, v in state.seconds.items()})
    if hasattr(state, "design"):
        prog.save(num_subsets=int(state.design.num_subsets))
    return prog.entry


def run_isolated(name: str, n: int, env: dict, cap_s: float, cell_dir: str) -> dict:
    """``run_cell`` in a child process; its group is killed at ``cap_s`` seconds of fit +
    score (counted from its ``setup_done``) or at ``SETUP_TIMEOUT_S`` of setup."""
    path = os.path.join(cell_dir, f"{name}_{n}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, "-m", "experiments.benchmarks.cost_scaling", f"--worker_method={name}"]
    cmd += [f"--worker_n={n}", f"--worker_out={path}", f"--worker_env={json.dumps(env)}"]
    log = open(path + ".log", "w")  # noqa: SIM115 (closed below)
    start = time.time()
    child = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=log, stderr=log)
    status, hwm, clock = None, 0.0, None
    while status is None:
        try:
            child.wait(timeout=POLL_S)
            status = "exited"
        except subprocess.TimeoutExpired:
            hwm = max(hwm, _vmhwm_mb(child.pid) or 0.0)
            if clock is None and os.path.exists(path):
                with open(path) as f:
                    clock = json.load(f).get("t_clock")
            now = time.time()
            if clock is not None and now - clock > cap_s:
                status = "capped"
            elif clock is None and now - start > SETUP_TIMEOUT_S:
                status = "setup_timeout"
            if status in ("capped", "setup_timeout"):
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    log.close()
    entry = dict(phase="starting")
    if os.path.exists(path):
        with open(path) as f:
            entry = json.load(f)
    entry["peak_rss_mb"] = max(hwm, entry.get("peak_rss_mb", 0.0))
    entry["wall_s"] = time.time() - start
    if status == "capped":
        entry.update(status="capped", ran_s=time.time() - entry["t_clock"])
    elif status == "setup_timeout":
        entry.update(status="failed", error=f"setup did not finish in {SETUP_TIMEOUT_S:.0f}s")
    elif child.returncode or entry.get("phase") != "done":
        with open(path + ".log") as f:
            tail = f.read()[-3000:]
        error = entry.get("error") or f"exit code {child.returncode}"
        limit = env.get("mem_limit_gb") or 0
        if child.returncode < 0 and limit and entry["peak_rss_mb"] > 0.9 * limit * 1024:
            error += f" (crashed at peak RSS {entry['peak_rss_mb']:.0f} MB: the {limit} GB limit)"
        entry.update(status="failed", error=error, exit_code=child.returncode, log_tail=tail)
    else:
        entry["status"] = "ok"
    return entry


def machine() -> dict:
    """``throughput.machine()`` (imported here: that module defines a required ``--out`` flag
    at import) and the Python version."""
    from experiments.benchmarks import throughput

    return throughput.machine() | dict(python=sys.version.split()[0])


# --- the run ----------------------------------------------------------------------------------


def run(
    model: str,
    n_train: list[int],
    n_query: int,
    max_len: int,
    names: list[str],
    cap_s: float,
    workdir: str,
    weights: str = WEIGHTS,
    isolate: bool = True,
    run_after_cap: bool = False,
    mem_limit_gb: float = 0.0,
    append: bool = False,
    stride_rank: int = 0,
) -> dict:
    os.makedirs(workdir, exist_ok=True)
    cell_dir = os.path.join(workdir, "cells")
    os.makedirs(cell_dir, exist_ok=True)
    n_train = sorted(n_train)
    res = dict(machine=machine(), model=model, methods=list(names), n_train=n_train)
    res.update(n_query=n_query, max_len=max_len, time_cap_s=cap_s, isolate=isolate)
    res["mem_limit_gb"] = mem_limit_gb if isolate else None
    res["note"] = "times include compilation; the cap counts fit + score, not setup"
    data_path = os.path.join(workdir, "rows.npz")
    t0 = time.time()
    res["data"] = prepare_data(model, max(n_train), n_query, max_len, weights, data_path)
    res["data"]["prepare_s"] = time.time() - t0
    env = dict(model=model, weights=weights, data=data_path, max_len=max_len)
    env["mem_limit_gb"], env["stride_rank"] = mem_limit_gb, stride_rank
    env["vocab_size"] = res["data"]["vocab_size"]
    out_path = os.path.join(workdir, "cost_scaling.json")
    res["cells"], res["runs"] = {}, []
    if append and os.path.exists(out_path):  # keep the earlier runs' cells of other methods
        with open(out_path) as f:
            old = json.load(f)
        res["cells"] = {k: c for k, c in old["cells"].items() if c["method"] not in names}
        res["runs"] = old.get("runs", [])
        res["model_info"] = old.get("model_info")
        res["methods"] = [m for m in old["methods"] if m not in names] + list(names)
    res["runs"].append(
        dict(methods=list(names), n_train=n_train, time_cap_s=cap_s, mem_limit_gb=mem_limit_gb)
        | dict(machine=res["machine"])
    )
    capped_at: dict[str, str] = {}  # method -> why its larger N are skipped
    for n in n_train:  # every method at the smallest N first
        for name in names:
            key = f"{name}/{n}"
            if name in capped_at and not run_after_cap:
                entry = dict(status="skipped", reason=capped_at[name])
            elif isolate:
                entry = run_isolated(name, n, env, cap_s, cell_dir)
            else:
                try:
                    entry = run_cell(name, n, env) | dict(status="ok")
                except Exception as e:  # noqa: BLE001 (recorded; the other cells still run)
                    entry = dict(status="failed", error=f"{type(e).__name__}: {e}")
                    entry["traceback"] = traceback.format_exc()[-3000:]
            entry.update(method=name, N=n)
            res["cells"][key] = entry
            if entry["status"] in ("capped", "failed"):
                capped_at.setdefault(name, f"{entry['status']} at N={n}")
            if entry.get("model_info"):
                res["model_info"] = entry["model_info"]
            print(f"{key}: {_status_line(entry)}", flush=True)
            _throughputs(res)
            res["growth"] = _growth(res)
            res["loadavg_1_5_15_end"] = list(os.getloadavg())
            _save(res, out_path)
    res["total_s"] = time.time() - t0
    _save(res, out_path)
    return res


def _save(res: dict, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


def _status_line(e: dict) -> str:
    if e["status"] == "ok":
        return (
            f"ok, fit {e['fit_s']:.1f}s, score {e['score_s']:.1f}s, peak {e['peak_rss_mb']:.0f} MB"
        )
    if e["status"] == "capped":
        return f"capped after {e['ran_s']:.0f}s in phase {e['phase']}"
    return f"{e['status']}: {e.get('reason') or e.get('error')}"


def _growth(res: dict) -> dict:
    """Per method, between consecutive finished N: the ratio of N, of fit and of score time."""
    out = {}
    for name in res["methods"]:
        ok = sorted(
            (c for c in res["cells"].values() if c["method"] == name and c["status"] == "ok"),
            key=lambda c: c["N"],
        )
        out[name] = [
            dict(N=[a["N"], b["N"]], n_ratio=b["N"] / a["N"], fit_ratio=b["fit_s"] / a["fit_s"])
            | dict(score_ratio=b["score_s"] / a["score_s"])
            for a, b in zip(ok, ok[1:], strict=False)
        ]
    return out


def _throughputs(res: dict) -> None:
    """Per cell: fit rows/s (finished cells); for capped / skipped cells the throughput of the
    method's largest finished cell, the fit time it projects to, and (capped) the measured
    upper bound N / seconds run."""
    for e in res["cells"].values():
        if e["status"] == "ok":
            e["fit_rows_per_s"] = e["N"] / e["fit_s"]
            e["score_queries_per_s"] = res["n_query"] / e["score_s"]
            continue
        done = [
            c
            for c in res["cells"].values()
            if c["method"] == e["method"] and c["status"] == "ok" and c["N"] < e["N"]
        ]
        if e["status"] == "capped" and e["phase"] == "setup_done":  # capped in fit
            e["fit_rows_per_s_upper_bound"] = e["N"] / e["ran_s"]
        if done:
            best = max(done, key=lambda c: c["N"])
            e["throughput_from_N"] = best["N"]
            e["fit_rows_per_s_measured"] = best["N"] / best["fit_s"]
            e["fit_s_projected"] = e["N"] / e["fit_rows_per_s_measured"]


def format_table(res: dict) -> str:
    """The Markdown table BENCHMARKS.md gets."""
    rows = [
        "| method | N | status | fit s | score s (64 q) | peak RSS MB | fit rows/s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows[0] = rows[0].replace("64 q", f"{res['n_query']} q")
    order = {m: i for i, m in enumerate(res["methods"])}
    cells = sorted(res["cells"].values(), key=lambda c: (order.get(c["method"], 99), c["N"]))
    for e in cells:
        name, n, st = e["method"], e["N"], e["status"]
        if st == "ok":
            rows.append(
                f"| {name} | {n} | ok | {e['fit_s']:.1f} | {e['score_s']:.1f} | "
                f"{e['peak_rss_mb']:.0f} | {e['fit_rows_per_s']:.3g} | |"
            )
            continue
        note = []
        fit = score = "-"
        if st == "capped":
            if e["phase"] == "fit_done":
                fit = f"{e['fit_s']:.1f}"
                score = f"> {e['ran_s'] - e['fit_s']:.0f} (capped)"
            else:
                fit = f"> {e['ran_s']:.0f} (capped)"
                note.append(f"fit < {e['fit_rows_per_s_upper_bound']:.3g} rows/s (measured bound)")
        elif st != "skipped":
            note.append(str(e.get("error", ""))[:80])
        else:
            note.append(f"skipped: {e['reason']}")
        if "fit_s_projected" in e:
            note.append(
                f"~{e['fit_s_projected']:.0f} s projected at N={e['throughput_from_N']}'s "
                f"{e['fit_rows_per_s_measured']:.3g} rows/s"
            )
        rss = f"{e['peak_rss_mb']:.0f}" if e.get("peak_rss_mb") else "-"
        rows.append(f"| {name} | {n} | {st} | {fit} | {score} | {rss} | - | {'; '.join(note)} |")
    rows += ["", "| method | parameters | what |", "|---|---|---|"]
    seen = set()
    for e in res["cells"].values():
        p = e.get("params")
        if not p or e["method"] in seen:
            continue
        seen.add(e["method"])
        if "params_above_hook" in p:
            count = f"{p['params_above_hook']:,} above the hook (layer {p['hook_layer']})"
            what = f"{p['what']}; T={p['num_subsets']}, rank {p['rank']} "
            what += f"(recipe {p.get('recipe_rank', p['rank'])}), "
            what += f"{p['gate_params_per_operator']:,} gate params per operator"
        else:
            count = f"{p['params_differentiated']:,} differentiated"
            what = p["what"]
        rows.append(f"| {e['method']} | {count} | {what} |")
    return "\n".join(rows)


# --- the binary -------------------------------------------------------------------------------


def define_flags() -> None:
    flags.DEFINE_list("n_train", ["256", "1024", "4096"], "Training pairs per cell.")
    flags.DEFINE_integer("n_query", 64, "Query pairs.")
    flags.DEFINE_integer("max_len", 128, "Tokens per pair (truncated).")
    flags.DEFINE_list("methods", list(METHODS), f"Methods, of {list(KNOWN)}.")
    flags.DEFINE_float("time_cap_s", 600.0, "Seconds of fit + score per (method, N) cell.")
    flags.DEFINE_string("workdir", None, "Writes DIR/cost_scaling.json (and the cells' logs).")
    flags.DEFINE_enum(
        "model", "smollm2", ["smollm2", "small"], "SmolLM2-135M or a tiny random one."
    )
    flags.DEFINE_string("weights", WEIGHTS, "SmolLM2-135M-Instruct GGUF file.")
    flags.DEFINE_bool("isolate", True, "Each cell in its own process, killed at the cap.")
    flags.DEFINE_bool("run_after_cap", False, "Run a method's larger N after it was capped.")
    flags.DEFINE_float(
        "mem_limit_gb", 12.0, "Per-cell memory limit (RLIMIT_DATA; 0: none): over it, fails."
    )
    flags.DEFINE_bool(
        "append", False, "Keep DIR/cost_scaling.json's cells of the methods not run now."
    )
    flags.DEFINE_integer(
        "stride_rank", 0, "STRIDE's rank (0: the recipe's, capped by the library's limit)."
    )
    flags.DEFINE_string("worker_method", None, "Internal: run one cell in this process.")
    flags.DEFINE_integer("worker_n", None, "Internal: its N.")
    flags.DEFINE_string("worker_out", None, "Internal: its record.")
    flags.DEFINE_string("worker_env", None, "Internal: its data and model (JSON).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.worker_method:
        env = json.loads(f.worker_env)
        if env.get("mem_limit_gb"):  # the cell's allocations fail beyond it (RLIMIT_DATA)
            limit = int(env["mem_limit_gb"] * 2**30)
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        run_cell(f.worker_method, f.worker_n, env, f.worker_out)
        return
    if not f.workdir:
        raise app.UsageError("--workdir is required")
    unknown = sorted(set(f.methods) - set(KNOWN))
    if unknown:
        raise app.UsageError(f"unknown methods {unknown}; choose from {list(KNOWN)}")
    weights = os.path.abspath(f.weights)
    if f.model == "smollm2" and not os.path.isfile(weights):
        raise app.UsageError(f"{weights} not found; run python -m experiments.fetch_smollm2")
    res = run(
        f.model,
        [int(n) for n in f.n_train],
        f.n_query,
        f.max_len,
        list(f.methods),
        f.time_cap_s,
        os.path.abspath(f.workdir),
        weights,
        f.isolate,
        f.run_after_cap,
        f.mem_limit_gb,
        f.append,
        f.stride_rank,
    )
    print(format_table(res))
    print(f"total {res['total_s']:.0f}s; results: {os.path.join(f.workdir, 'cost_scaling.json')}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
