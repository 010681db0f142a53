"""The decoder task: a frozen NNX transformer (``models.transformer``) and its token rows.

Rows are fixed-length token blocks (``data.TokenBlocks``): a whole example or one chunk of a
long one; ``sum_to_examples`` adds chunk scores back up. A row's loss is the mean next-token
cross-entropy over its target tokens (for SFT rows, the response tokens only). ``recipe`` is
the ``lm_train`` config that made ``params`` from ``params0`` (a random init for
pre-training, the pre-trained model for SFT), so ``retrain`` reproduces it on weighted rows
and TracIn can replay its trajectory.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stride_jax import resources, sharding
from stride_jax.func import programs
from stride_jax.models import lm_train
from stride_jax.task import Task, as_weights


@dataclasses.dataclass
class DecoderTask(Task):
    """A frozen decoder (``transformer.Decoder`` graphdef + params) and its token rows.

    ``model_config`` is its ``transformer.DecoderConfig``; ``tokenizer`` decodes rows to text
    (text-similarity baselines, ``render``).
    """

    kind = "decoder"

    model_config: object = None
    recipe: object = None
    params0: object = None
    tokenizer: object = None

    # --- rows ------------------------------------------------------------------------------

    def arrays(self, rows) -> dict:
        return lm_train.data_arrays(rows)

    def data(self, blocks=None) -> dict:
        """Device arrays of ``blocks`` (default: the training rows)."""
        return self.arrays(self.train if blocks is None else blocks)

    @property
    def num_examples(self) -> int:
        return self.train.num_examples

    def sum_to_examples(self, scores_QxN) -> np.ndarray:
        return self.train.sum_to_examples(scores_QxN)

    def example_weights(self, masks_MxE) -> np.ndarray:
        return np.asarray(masks_MxE)[:, self.train.example_id_N]

    def render(self, rows, i: int):
        """Row i as text, with the scored (target) span marked by the loss mask."""
        n = int(rows.attn_mask_NxL[i].sum())
        ids = [int(t) for t in rows.tokens_NxL[i, :n]]
        target = [bool(m) for m in rows.loss_mask_NxL[i, :n]]
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else str(ids)
        key = rows.example_keys[int(rows.example_id_N[i])]
        return {"text": text, "tokens": ids, "target": target, "id": str(key)}

    def perturbed(self, rows, key, amount: float):
        """``rows`` with a fraction ``amount`` of each row's target tokens (at least one)
        replaced by tokens drawn uniformly from the model's vocabulary."""
        tokens = np.array(rows.tokens_NxL)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
        vocab = int(self.model_config.vocab_size)
        for i in range(len(rows)):
            where = np.flatnonzero(rows.loss_mask_NxL[i] > 0)
            if where.size == 0:
                continue
            n = max(1, int(round(amount * where.size)))
            pos = rng.choice(where, size=min(n, where.size), replace=False)
            tokens[i, pos] = rng.integers(0, vocab, size=pos.size)
        return dataclasses.replace(rows, tokens_NxL=tokens)

    # --- the model --------------------------------------------------------------------------

    def loss(self, params, batch: dict) -> jax.Array:
        return lm_train.example_losses(
            self.graphdef, params, batch["tokens"], batch["attn"], batch["loss_mask"]
        )

    def output(self, params, batch: dict):
        loss = self.loss(params, batch)
        return -loss, jnp.ones_like(loss)

    def default_param_pattern(self, select) -> str:
        """The MLPs of the last ``select.layers`` blocks (default 1)."""
        n = self.model_config.n_layers
        layers = int((select or {}).get("layers", 1))
        if not 1 <= layers <= n:
            raise ValueError(f"layers must be in 1..{n} (the model's depth), got {layers}")
        last = "|".join(str(i) for i in range(n - layers, n))
        return rf"^layers/({last})/mlp/"

    # --- the recipe ---------------------------------------------------------------------------

    def retrain(self, key, weight_N=None):
        """Params trained with the recipe from ``params0`` (optional row weights)."""
        w = as_weights(weight_N, len(self.train))
        return lm_train.jitted_fit(self.recipe, self.graphdef)(self.params0, key, self.data(), w)

    def retrain_losses(
        self, keys_M, weights_MxN, rows, group: int = 1, label="retrains", on_group=None
    ):
        """losses_MxB on ``rows`` (a ``TokenBlocks`` or its arrays) of M decoders retrained
        from ``params0`` on row weights, ``group`` at a time in one vmapped call (0: as many
        as fit in memory); after each group ``on_group(losses so far, models done)`` (e.g. a
        partial save) may run; progress is logged as ``label``."""
        return retrain_losses(self, keys_M, weights_MxN, rows, group, on_group, label=label)

    # --- STRIDE's site --------------------------------------------------------------------------

    def site(self, config):
        from stride_jax.stride import sites

        return sites.decoder_site(self, config)

    # --- dense layers (K-FAC / EK-FAC) ---------------------------------------------------------

    def dense_layers(self, select=None) -> tuple[str, ...]:
        """The dense kernels among the chosen parameters (default: the last MLP's ``fc`` and
        ``proj``); their biases are left out."""
        from stride_jax.func import layers

        return layers.kernel_paths(self.param_names(select))

    def dense_io(
        self, params, batch: dict, layers, fisher: str = "empirical", key=None, with_data=False
    ):
        """Token-level inputs and output gradients (``func.layers.layer_io``); a padding token
        has mask 0 (and zero output gradient). With ``with_data`` and a sampled Fisher, the
        data labels' output gradients come from the same forward pass (see ``Task``)."""
        from stride_jax.func import layers as func_layers

        if fisher not in ("empirical", "sampled"):
            raise ValueError(
                f"fisher must be 'empirical' or 'sampled' for a decoder, got {fisher!r}"
            )
        k = key if fisher == "sampled" else None
        both = with_data and k is not None
        io = func_layers.layer_io(self.graphdef, params, layers, batch, k, data_too=both)
        io, g_data = io if both else (io, [g for _, g in io])
        ones = jnp.ones(batch["tokens"].shape[0], jnp.float32)
        mask = batch["attn"].astype(jnp.float32)
        out = [a for a, _ in io], mask, [(ones, [g for _, g in io])]
        return (*out, g_data) if with_data else out

    # --- the base model's trajectory (TracIn) ----------------------------------------------

    def trajectory(self, num_checkpoints: int):
        """(params after each of C evenly spaced segments of the recipe, lr_C): the recipe
        replayed from ``params0`` with key(seed) and all-ones weights (``lm_train.run_steps``
        segment by segment); lr_c is the mean scheduled learning rate over segment c."""
        from stride_jax.models import mlp

        recipe = self.recipe
        ends_C = mlp.checkpoint_steps(recipe.steps, num_checkpoints)

        def build():  # kept per task and recipe: a second TracIn fit compiles nothing
            return lambda s, d, w, k, n: lm_train.run_steps(recipe, self.graphdef, s, k, d, w, n)[0]

        run = programs.per_task(self, ("trajectory", recipe.to_json()), build, static_argnums=4)
        state = {**lm_train.init_state(recipe, self.params0), "step": jnp.int32(0)}
        data, w, key = self.data(), jnp.ones(len(self.train)), jax.random.key(self.seed)
        ckpts, start = [], 0
        for end in ends_C:
            state = run(state, data, w, key, int(end - start))
            ckpts.append(state["params"])
            start = int(end)
        lr_T = np.asarray(lm_train.schedule(recipe)(np.arange(recipe.steps)), np.float64)
        lr_C = [lr_T[a:b].mean() for a, b in zip([0, *ends_C[:-1]], ends_C, strict=True)]
        return ckpts, np.asarray(lr_C)


def retrain_losses(
    task: DecoderTask,
    keys_M,
    weights_MxN,
    rows,
    group: int,
    on_group=None,
    done=(),
    label: str = "retrains",
):
    """See ``DecoderTask.retrain_losses``; ``done`` holds losses of models already trained.
    ``group`` 0 chooses it from the memory available (``group_size``); progress is logged
    as ``label`` with rate and ETA."""
    m = len(weights_MxN)
    mesh = task.mesh if task.mesh is not None else sharding.make_mesh()
    group = group_size(task, m, group, label, mesh)
    fn = _retrain_fn(task.recipe.to_json(), task.graphdef, mesh)
    q = rows if isinstance(rows, dict) else task.arrays(rows)
    data, out = task.data(), list(done)
    progress = resources.Progress(label, m, start=len(out))
    for start in range(len(out), m, group):
        stop = min(start + group, m)
        weights = jnp.asarray(np.asarray(weights_MxN[start:stop]), jnp.float32)
        weights_G, n = sharding.pad_to_multiple(weights, group)  # the last group padded
        keys_G, _ = sharding.pad_to_multiple(keys_M[start:stop], group)
        losses = fn(task.params0, keys_G, data, weights_G, q)[:n]
        out.extend(np.asarray(jax.device_get(losses), np.float32))
        progress.update(stop)
        if on_group is not None:
            on_group(np.stack(out), stop)
    return np.stack(out)


def group_size(
    task: DecoderTask, num_models: int, requested: int, what: str = "retrains", mesh=None
):
    """Models per vmapped retrain call: ``requested`` (at most M), or when 0
    ``resources.models_at_once`` for one retrain of the task's recipe; rounded up to a
    multiple of the mesh's device count (the models are split over every device)."""
    multiple = 1 if mesh is None else sharding.size(mesh)
    if int(requested) > 0:
        group = min(int(requested), max(int(num_models), 1))
        return -(-group // multiple) * multiple
    num_params = sum(int(np.size(x)) for x in jax.tree.leaves(task.params0))
    per_model = resources.decoder_retrain_bytes(
        task.model_config, task.recipe.batch, len(task.train), num_params
    )
    return resources.models_at_once(requested, num_models, per_model, what=what, multiple=multiple)


@functools.lru_cache(maxsize=4)
def _retrain_fn(recipe_json: str, graphdef, mesh):
    """Jitted: a group of models trained at once (vmap, the models split over every device
    of ``mesh``) -> their losses on the rows ``q``, evaluated ``recipe.batch`` rows at a time
    (an evaluation costs no more than a step)."""
    recipe = ml_collections.ConfigDict(json.loads(recipe_json))
    chunk = int(recipe.batch)

    def fn(params0, keys_G, data, weights_GxN, q):
        n = q["tokens"].shape[0]
        q_CxB = jax.tree.map(
            lambda a: jnp.pad(a, [(0, (-n) % chunk)] + [(0, 0)] * (a.ndim - 1)).reshape(
                -1, chunk, *a.shape[1:]
            ),
            q,
        )

        def one(key, w):
            p = lm_train.fit(recipe, graphdef, params0, key, data, w)

            def losses(b):
                return lm_train.example_losses(graphdef, p, b["tokens"], b["attn"], b["loss_mask"])

            return jax.lax.map(losses, q_CxB).reshape(-1)[:n]

        return jax.vmap(one)(keys_G, weights_GxN)

    models, rep = sharding.over_every(mesh), sharding.replicated(mesh)
    return sharding.jit(fn, (rep, models, rep, models, rep), models)
