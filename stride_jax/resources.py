"""How many retrains run at once, from the memory there is; progress lines for long loops.

The rule (``models_at_once``), used wherever retrains are vmapped in groups (the ground
truth, the noise ceiling, the datamodel's retrains) when the group size asked for is 0 (auto):

    available = half of the free memory: on a device whose allocator reports a
                ``bytes_limit`` (GPU, TPU), ``bytes_limit - bytes_in_use``; on CPU,
                ``MemAvailable`` from /proc/meminfo
    per_model = an estimate of one retrain's peak: its parameters, gradients and optimizer
                state (6 copies), the activations of one training step over the rows one
                step reads (forward and backward), the evaluation of one chunk of rows and
                the per-row weights (``classifier_retrain_bytes``, ``decoder_retrain_bytes``)
    group     = floor(available / per_model), clamped to [1, 64] and to the number of models,
                then rounded down to a multiple of the mesh's model axis (at least one
                multiple)

A positive group size is used as given. The group size changes neither the models (each has
its own key) nor their losses beyond float rounding; only memory and speed. The chosen
value and the rule's inputs are logged once per stage.
"""

from __future__ import annotations

import time

import jax
from absl import logging

from stride_jax import distributed

MAX_GROUP = 64
# Rows per step of the full-batch MLP's gradient (``models.mlp``): above this many training
# rows the gradient is accumulated over chunks, so one retrain's memory does not grow with N.
MLP_ROW_CHUNK = 32768
_F32 = 4


def available_bytes() -> int:
    """Half of the free memory of the default device (CPU: ``MemAvailable``); in a multi-host
    run process 0's (whose device is the first), so every process sizes its work alike."""
    return distributed.agreed(_available_bytes())


def _available_bytes() -> int:
    stats = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory stats: fall back to the host
        stats = {}
    if "bytes_limit" in stats:
        return max(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), 0) // 2
    return host_available_bytes() // 2


def host_available_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (4 GiB when it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def classifier_retrain_bytes(
    n_rows: int, in_dim: int, hidden, num_classes: int, num_params: int
) -> int:
    """Peak bytes of one full-batch MLP retrain (``models.mlp.fit``) on ``n_rows`` rows: six
    copies of the parameters, and per row of a gradient chunk (at most ``MLP_ROW_CHUNK``
    rows) its input, three copies of each hidden layer (pre-activation, activation, its
    gradient) and of the logits; plus the row weights."""
    rows = min(int(n_rows), MLP_ROW_CHUNK)
    per_row = in_dim + 3 * (sum(int(h) for h in hidden) + num_classes)
    return _F32 * (6 * int(num_params) + rows * per_row + 2 * int(n_rows))


def decoder_row_bytes(model_config) -> int:
    """Activation bytes of one token row in one forward pass of a decoder: per layer the
    residual stream and its projections, the attention scores and the MLP's hidden layer;
    the logits over the vocabulary."""
    c = model_config
    length = c.max_len
    per_token = c.n_layers * (8 * c.d_model + 2 * c.n_heads * length + 2 * c.d_ff)
    per_token += 2 * c.vocab_size
    return _F32 * length * per_token


def decoder_retrain_bytes(model_config, batch: int, n_rows: int, num_params: int) -> int:
    """Peak bytes of one decoder retrain (``models.lm_train.fit``): six copies of the
    parameters, a training step over ``batch`` rows (forward and backward: 3 forward's
    worth), an evaluation chunk of ``batch`` rows and the sampling weights of ``n_rows``."""
    row = decoder_row_bytes(model_config)
    return _F32 * (6 * int(num_params) + 4 * int(n_rows)) + 4 * int(batch) * row


def models_at_once(
    requested: int,
    num_models: int,
    per_model_bytes: int,
    *,
    what: str = "retrains",
    multiple: int = 1,
    available: int | None = None,
) -> int:
    """The group size: ``requested`` when positive, else the rule of the module doc."""
    requested = int(requested)
    if requested < 0:
        raise ValueError(f"models per batch must be >= 0 (0: auto), got {requested}")
    if requested > 0:
        return requested
    avail = available_bytes() if available is None else int(available)
    per = max(int(per_model_bytes), 1)
    group = min(max(avail // per, 1), MAX_GROUP, max(int(num_models), 1))
    if multiple > 1:
        group = max(group // multiple, 1) * multiple
    _log_once(
        "%s: %d models at a time (about %s each, %s available)",
        what,
        group,
        human_bytes(per),
        human_bytes(avail),
    )
    return int(group)


def items_at_once(total: int, per_item_bytes: int, cap_bytes: int = 2**30) -> int:
    """How many of ``total`` independent items (queries, rows) to process in one call so that
    their working memory (``per_item_bytes`` each) stays under ``min(cap_bytes, available)``;
    at least 1."""
    budget = min(int(cap_bytes), available_bytes())
    return int(max(1, min(int(total), budget // max(int(per_item_bytes), 1))))


_LOGGED: set = set()


def _log_once(fmt: str, *args) -> None:
    line = fmt % args
    if line not in _LOGGED:
        _LOGGED.add(line)
        logging.info(line)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB", "MB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """``Progress(label, total, unit)``; ``.update(done)`` logs ``"label: 32/100 models, 2.1
    models/s, ETA 32 s"`` at most every ``every_s`` seconds, and always when done reaches
    the total. ``start`` counts work already done before (a resumed run) out of the rate."""

    def __init__(
        self, label: str, total: int, unit: str = "models", every_s: float = 5.0, start: int = 0
    ):
        self.label, self.total, self.unit, self.every_s = label, int(total), unit, every_s
        self._t0 = self._last = time.monotonic()
        self._start = int(start)

    def update(self, done: int) -> None:
        now = time.monotonic()
        done = int(done)
        if done < self.total and now - self._last < self.every_s:
            return
        self._last = now
        rate = (done - self._start) / max(now - self._t0, 1e-9)
        line = f"{self.label}: {done}/{self.total} {self.unit}, {rate:.3g} {self.unit}/s"
        if done < self.total and rate > 0:
            line += f", ETA {(self.total - done) / rate:.0f} s"
        else:
            line += f", {now - self._t0:.1f} s"
        logging.info(line)
