"""Shared plumbing of the absl binaries in experiments/: logging, user errors, the summary."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import sys
import textwrap

from absl import app, flags, logging

from stride_jax import distributed
from stride_jax.checkpoint import CheckpointError
from stride_jax.data import DataError
from stride_jax.errors import ConfigError
from stride_jax.eval import report
from stride_jax.logs import only_stride_jax_info
from stride_jax.task import TaskError

USER_ERRORS = (DataError, ConfigError, CheckpointError, TaskError)

# experiments/ beside this package (a checkout, or an editable install of one).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "experiments", "configs")


def config_file(name: str) -> str:
    """The path of experiments/configs/<name> wherever the binary is run from."""
    return os.path.join(CONFIG_DIR, name)


def resolve_config_path(path: str) -> str:
    """``path`` if it exists; else the same path under the repository root, or the config
    of that file name in experiments/configs (so ``--config=experiments/configs/x.py`` works
    from any directory); else ``path`` unchanged (the flag then reports it missing)."""
    spec, colon, arg = path.partition(":")  # ml_collections allows file.py:argument
    if os.path.exists(spec):
        return path
    for candidate in (os.path.join(REPO_ROOT, spec), config_file(os.path.basename(spec))):
        if os.path.isfile(candidate):
            return candidate + colon + arg
    return path


def _config_value_index(argv: list[str]) -> int | None:
    """Index in ``argv`` of the --config flag's value (``--config=X`` or ``--config X``)."""
    for i, a in enumerate(argv):
        if a.startswith("--config=") or a.startswith("-config="):
            return i
        if a in ("--config", "-config") and i + 1 < len(argv):
            return i + 1
    return None


def _load_config(path: str):
    """The ConfigDict a config file's ``get_config()`` returns (None when it cannot load)."""
    spec_path = path.partition(":")[0]
    try:
        spec = importlib.util.spec_from_file_location("_stride_config_probe", spec_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception:  # noqa: BLE001 - only used to explain a flag error better
        return None


def unknown_override(config, argv: list[str]) -> str | None:
    """A one-line message for the first ``--config.a.b=...`` whose key ``config`` lacks,
    with the closest known keys ("did you mean"); None when every override's key exists."""
    for a in argv:
        if not a.startswith("--config.") and not a.startswith("-config."):
            continue
        key = a.split("config.", 1)[1].split("=", 1)[0]
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            known = list(node.keys()) if hasattr(node, "keys") else []
            if part not in known:
                where = ".".join(parts[:depth]) or "the config"
                if not known:
                    return f"unknown config key {key!r}: {where} is a value, not a block"
                close = difflib.get_close_matches(part, known, n=3, cutoff=0.6)
                prefix = ".".join(parts[:depth])
                hint = (
                    "did you mean "
                    + " or ".join(repr(".".join(filter(None, [prefix, c]))) for c in close)
                    if close
                    else f"known keys of {where}: {', '.join(sorted(known))}"
                )
                return f"unknown config key {key!r}; {hint}"
            node = node[part]
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError-style quoting
        text = text[1:-1]
    return " ".join(text.replace("\\n", " ").split()) or type(e).__name__


def _resolved_argv(argv: list[str]) -> tuple[list[str], int | None]:
    """``argv`` with the --config path resolved (``resolve_config_path``), and its index."""
    argv = list(argv)
    i = _config_value_index(argv)
    if i is not None:
        if argv[i].startswith("-"):
            flag, _, value = argv[i].partition("=")
            argv[i] = f"{flag}={resolve_config_path(value)}"
        else:
            argv[i] = resolve_config_path(argv[i])
    return argv, i


def _flag_error(e: BaseException, argv: list[str], i: int | None, default_config) -> None:
    """Print the one line for a flag error and exit 2 (the unknown key, if that is it)."""
    path = argv[i].split("=", 1)[-1] if i is not None else default_config
    if path and not os.path.isfile(path.partition(":")[0]):
        print(
            f"error: config file {path!r} does not exist (nor under {REPO_ROOT} or {CONFIG_DIR})",
            file=sys.stderr,
        )
        sys.exit(2)
    config = _load_config(path) if path else None
    message = (unknown_override(config, argv) if config is not None else None) or _one_line(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def define_host_flags() -> None:
    """Flags of every binary that ``run_app`` runs: the multi-host triple passed to
    ``jax.distributed.initialize`` (``stride_jax.distributed``) and the persistent XLA
    compilation cache."""
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-host: host:port of process 0's coordinator (with --num_processes, --process_id).",
    )
    flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes run the job.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process, 0 .. num_processes-1.")
    flags.DEFINE_string(
        "compilation_cache_dir",
        None,
        "Persistent XLA compilation cache directory: reruns load compiled programs from it.",
    )


def _host_flags() -> tuple:
    f = flags.FLAGS
    return f.coordinator_address, f.num_processes, f.process_id


def run_app(main, define_flags, default_config: str | None = None) -> None:
    """``app.run(main)`` for the binaries, after ``define_flags()`` and ``define_host_flags()``:
    a --config path that does not exist from here is looked up in the repository
    (``resolve_config_path``), and any flag error (an unknown flag or config key, a bad value,
    a missing config file, a bad multi-host combination) prints one line naming it and exits 2
    instead of a traceback. ml_collections applies the overrides of a default config when the
    flag is defined, so both steps are guarded. Before ``main`` runs, a multi-host run joins
    its peers and the compilation cache is set."""
    sys.argv, i = _resolved_argv(sys.argv)
    try:
        define_flags()
        define_host_flags()
    except Exception as e:  # noqa: BLE001 - every flag error ends in one line
        _flag_error(e, sys.argv, i, default_config)

    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
            if "config" in flags.FLAGS:  # a config file that failed to load fails lazily
                flags.FLAGS.config.to_dict()
        except Exception as e:  # noqa: BLE001
            _flag_error(e, argv, i, default_config)
        try:
            distributed.check_flags(*_host_flags())
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        return rest

    def start(argv):
        distributed.set_compilation_cache(flags.FLAGS.compilation_cache_dir)
        distributed.initialize(*_host_flags())
        return main(argv)

    app.run(start, flags_parser=parse)


def run_job(job, *args, extra_errors: tuple = ()):
    """``job(*args)`` with INFO progress from this package; a user error (bad data, config or
    workdir) prints one line naming the problem and exits 1 instead of a traceback."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(only_stride_jax_info)
    try:
        return job(*args)
    except (*USER_ERRORS, *extra_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def define_run_flags(default_config: str) -> None:
    """``--config`` (a run config file, locked: overrides cannot add keys) and ``--workdir``;
    called by a binary's ``define_flags``, not at import (tests import several binaries)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", default_config, "Run config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def application(job, format_table, name: str, default_config: str) -> None:
    """The whole of an application binary (experiments/selection.py, ...): flags
    (``define_run_flags``), ``job(config, workdir)`` with user errors as one line, its result
    printed with ``format_table`` and the path of ``workdir/<name>.json``."""

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
        # A decoder run also reports a bad checkpoint directory as one line.
        extra = (ValueError, FileNotFoundError) if config.get("task") == "decoder" else ()
        result = run_job(job, config, workdir, extra_errors=extra)
        print(format_table(result))
        print(f"results: {os.path.join(workdir, name + '.json')}")

    run_app(main, lambda: define_run_flags(default_config), default_config)


def print_summary(results: dict, workdir: str) -> None:
    """The LDS table, the noise ceiling (with what it means) and where results.json is."""
    print(format_table(results))
    if "noise_ceiling" in results:
        nc = results["noise_ceiling"]
        seeds = nc.get("seeds", 1)
        rows = [("" if seeds == 1 else f"{seeds}-seed ", nc), ("1-seed ", nc.get("single_seed"))]
        for what, e in rows:
            if e:
                print(
                    f"noise ceiling ({what}retrains vs retrains): LDS {e['lds']:.4f} "
                    f"[{e['lds_ci95'][0]:.3f}, {e['lds_ci95'][1]:.3f}]"
                )
        print(textwrap.fill(report.NOISE_CEILING_NOTE, width=96))
    print(f"results: {workdir}/results.json")


def _parse(value: str):
    """JSON values (numbers, true/false, lists) as such; anything else as a string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_sweep(sweep: list[str]) -> list[tuple[str, list]]:
    """Tuning axes: ``["a.b=1,2", "c=x"]`` -> ``[("a.b", [1, 2]), ("c", ["x"])]``."""
    for s in sweep:
        if "=" not in s:
            raise ConfigError(f"--sweep {s!r} is not of the form key=v1,v2,...")
    pairs = (s.split("=", 1) for s in sweep)
    return [(key, [_parse(v) for v in values.split(",")]) for key, values in pairs]


def set_path(config, key: str, value) -> None:
    """``config["a"]["b"] = value`` for key "a.b"; a key the config lacks raises
    ``ConfigError`` (a typo in a sweep must not silently add a setting nothing reads)."""
    *blocks, leaf = key.split(".")
    for block in blocks:
        if block not in config:
            raise ConfigError(f"unknown config key {key!r}: no block {block!r}")
        config = config[block]
    if leaf not in config:
        raise ConfigError(f"unknown config key {key!r}; known here: {sorted(config.keys())}")
    if isinstance(config[leaf], str) and not isinstance(value, str):
        value = json.dumps(value)  # e.g. fisher=true: the string "true", not the bool True
    config[leaf] = value


def sweep_dir(workdir: str, method: str, name: str, method_config) -> str:
    """Where one sweep point caches its work: named by the point and a digest of the method's
    whole resolved config, so points of sweeps over different base settings never collide."""
    digest = hashlib.sha256(method_config.to_json(sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(workdir, "sweep", method, f"{name}-{digest}")


def format_table(results: dict) -> str:
    """The LDS table printed at the end of a run: one row per method and ablation; the
    "vs stride" column (paired difference, method minus STRIDE) only when some row has one."""
    with_delta = report.has_delta(results)
    header = ("method", "LDS", "95% CI", "Pearson", "Kendall", "seconds")
    rows = [header + (("vs stride (paired CI)",) if with_delta else ())]
    for label, r, _ in report.entries(results):
        row = (
            label,
            f"{r['lds']:.4f}",
            f"[{r['lds_ci95'][0]:.3f}, {r['lds_ci95'][1]:.3f}]",
            f"{r['lds_pearson']:.4f}",
            f"{r['lds_kendall']:.4f}",
            f"{r['seconds']:.1f}",
        )
        rows.append(row + ((report.format_delta(r.get("delta_vs_stride")),) if with_delta else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)
