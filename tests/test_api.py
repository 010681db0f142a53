"""The public API on models the library does not know: a CNN defined here, and a decoder built
from a Hugging Face config dict, through ``stride_jax.tasks`` / ``attribute`` / ``evaluate``."""

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import stride_jax
from stride_jax.errors import ConfigError
from stride_jax.task import TaskError


class SmallCNN(nnx.Module):
    """8x8 images -> conv 3x3 (6 maps) -> GELU -> dense 32 -> GELU -> 10 logits."""

    def __init__(self, *, rngs):
        self.conv = nnx.Conv(1, 6, kernel_size=(3, 3), rngs=rngs)
        self.hidden = nnx.Linear(6 * 64, 32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def features(self, x_BxF):
        h = jax.nn.gelu(self.conv(x_BxF.reshape(-1, 8, 8, 1)))
        return jax.nn.gelu(self.hidden(h.reshape(h.shape[0], -1)))

    def __call__(self, x_BxF):
        return self.out(self.features(x_BxF))


def _cnn(key):
    return SmallCNN(rngs=nnx.Rngs(params=key))


@pytest.fixture(scope="module")
def cnn_task():
    splits = stride_jax.load_digits(n_train=240, n_query=12)
    recipe = stride_jax.tasks.adamw_recipe(_cnn, steps=80, lr=3e-3)
    x, y = jnp.asarray(splits.train.x_NxF), jnp.asarray(splits.train.y_N)
    params = recipe(jax.random.key(0), x, y, jnp.ones(len(y)))
    graphdef, _ = nnx.split(_cnn(jax.random.key(0)), nnx.Param)
    model = nnx.merge(graphdef, params)
    return stride_jax.tasks.classifier(
        model,
        train=(splits.train.x_NxF, splits.train.y_N),
        queries=(splits.query.x_NxF, splits.query.y_N),
        retrain=recipe,
    )


def test_import_is_light():
    import subprocess

    code = (
        "import sys, stride_jax; stride_jax.tasks; stride_jax.attribute; stride_jax.evaluate;"
        "stride_jax.datasets; stride_jax.set_verbosity;"
        "stride_jax.methods.load(); stride_jax.tasks.DecoderTask;"
        "heavy = [m for m in ('transformers', 'tokenizers', 'torch', 'sklearn') "
        "if m in sys.modules]; print(heavy); assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout


def test_user_cnn_stride_and_trak_end_to_end(cnn_task):
    gt = stride_jax.evaluate.ground_truth(cnn_task, num_models=16, alpha=0.5, seed=1)
    results = {}
    for method, config in (
        ("stride", {"design": {"num_subsets": 400, "degree": 4}}),
        ("trak", {"num_models": 2, "proj_dim": 512}),
        ("random", None),
    ):
        scores = stride_jax.attribute(cnn_task, method=method, config=config)
        assert scores.shape == (12, 240) and scores.dtype == np.float32
        assert np.isfinite(scores).all()
        res = stride_jax.evaluate.lds(cnn_task, scores, ground_truth_data=gt, n_boot=50)
        results[method] = res["lds"]
    # Both attribution methods clearly above the random floor on the same retrains.
    assert results["stride"] > results["random"] + 0.15, results
    assert results["trak"] > results["random"] + 0.15, results


def test_user_model_bad_inputs(cnn_task):
    splits = stride_jax.load_digits(n_train=50, n_query=5)
    model = _cnn(jax.random.key(0))
    train = (splits.train.x_NxF, splits.train.y_N)
    with pytest.raises(TaskError, match="x_query has 3 features but x_train has 64"):
        stride_jax.tasks.classifier(model, train=train, queries=(np.ones((2, 3)), np.zeros(2)))
    bad_params = nnx.split(SmallCNNWide(rngs=nnx.Rngs(0)), nnx.Param)[1]
    with pytest.raises(TaskError, match="params do not match the model: .*hidden.*shape"):
        stride_jax.tasks.classifier(model, train=train, queries=train, params=bad_params)
    with pytest.raises(TaskError, match=r"logits have shape \(2, 3\).*expected \(2, 10\)"):
        stride_jax.tasks.classifier(
            nnx.Linear(64, 3, rngs=nnx.Rngs(0)), train=train, queries=train, num_classes=10
        )
    with pytest.raises(TaskError, match=r"logits have shape \(2, 3\).*expected \(2, 10\)"):
        stride_jax.tasks.classifier(nnx.Linear(64, 3, rngs=nnx.Rngs(0)), train=train, queries=train)
    with pytest.raises(TaskError, match="cannot be applied"):
        stride_jax.tasks.classifier(nnx.Linear(5, 10, rngs=nnx.Rngs(0)), train=train, queries=train)
    with pytest.raises(ConfigError, match="unknown attribution method 'strid'"):
        stride_jax.attribute(cnn_task, method="strid")
    with pytest.raises(ConfigError, match="supports decoder tasks, not classifier"):
        stride_jax.attribute(cnn_task, method="bm25")
    with pytest.raises(ConfigError, match="unknown stride.design config key 'num_subset'"):
        stride_jax.attribute(cnn_task, config={"design": {"num_subset": 3}})
    with pytest.raises(ConfigError, match="hook='hidden'.*not one"):
        stride_jax.attribute(cnn_task, config={"hook": "hidden"})


class SmallCNNWide(SmallCNN):
    def __init__(self, *, rngs):
        super().__init__(rngs=rngs)
        self.hidden = nnx.Linear(6 * 64, 48, rngs=rngs)
        self.out = nnx.Linear(48, 10, rngs=rngs)


def test_decoder_from_hf_config_through_the_same_api():
    from stride_jax.data import CharTokenizer, Record, tokenize
    from stride_jax.models import transformer

    hf_config = {
        "model_type": "llama",
        "vocab_size": 40,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
        "tie_word_embeddings": True,
    }
    cfg = transformer.DecoderConfig.from_hf(hf_config)
    graphdef, params0 = transformer.build(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    words = ["to be", "or not", "the king", "a horse", "my lord", "good night"]
    records = [Record(f"ex{i}", " ".join(rng.choice(words, 3))) for i in range(40)]
    tok = CharTokenizer.from_corpus("".join(r.response for r in records), use_unk=True)
    rows = tokenize(records, tok, block_len=16)
    train, queries = rows.subset(np.arange(32)), rows.subset(np.arange(32, 36))
    recipe = ml_collections.ConfigDict(
        dict(
            steps=20,
            batch=8,
            lr=3e-3,
            warmup_steps=2,
            lr_end_frac=0.1,
            clip=1.0,
            weight_decay=0.0,
            seed=0,
        )
    )
    task0 = stride_jax.tasks.decoder(
        (graphdef, params0),
        train=train,
        queries=queries,
        recipe=recipe,
        params0=params0,
        tokenizer=tok,
    )
    task = stride_jax.tasks.decoder(
        (graphdef, task0.retrain(jax.random.key(0))),
        train=train,
        queries=queries,
        recipe=recipe,
        params0=params0,
        tokenizer=tok,
    )
    assert float(task.row_losses(train).mean()) < float(task0.row_losses(train).mean())
    stride_cfg = {
        "hook": "residual",  # the residual-stream operators with Adam steps
        "design": {"num_subsets": 24, "degree": 3},
        "stage1": {
            "steps": 10,
            "log_every": 5,
            "ckpt_every": 5,
            "rank": 4,
            "top_k": 4,
            "sketch_dim": 4,
            "subsets_per_step": 8,
        },
        "op_chunk": 8,
    }
    for method, config in (("stride", stride_cfg), ("stride", None), ("graddot", None)):
        scores = stride_jax.attribute(task, method=method, config=config)
        assert scores.shape == (4, train.num_examples) and np.isfinite(scores).all()
    with pytest.raises(ConfigError, match="frozen data basis: set stage1.lr_muon=0"):
        stride_jax.attribute(
            task, config={"hook": "residual", "stage1": {"basis": "pca", "lr_muon": 0.02}}
        )
    with pytest.raises(ConfigError, match="basis rank 64 exceeds the hooked feature dimension"):
        stride_jax.attribute(task, config={"hook": "residual", "stage1": {"basis": "pca"}})
    with pytest.raises(ConfigError, match="Adam steps need the residual-stream operators"):
        stride_jax.attribute(task, config={"stage1": {"steps": 10}})
    with pytest.raises(TaskError, match="token id .* vocabulary"):
        small = transformer.build(
            transformer.DecoderConfig.from_hf({**hf_config, "vocab_size": 5}), jax.random.key(0)
        )
        stride_jax.tasks.decoder(small, train=train, queries=queries)
    with pytest.raises(ConfigError, match="supports classifier tasks, not decoder"):
        stride_jax.attribute(task, method="featsim")


def test_design_note_method_example_registers_and_runs(cnn_task):
    """docs/architecture.md's "adding a method" example, run as written, through attribute."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "architecture.md")) as f:
        code = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    exec(compile(code, "architecture.md", "exec"), {})
    try:
        scores = stride_jax.attribute(cnn_task, method="mymethod")
        graddot = stride_jax.attribute(cnn_task, method="graddot")
        np.testing.assert_allclose(scores, graddot, rtol=1e-4, atol=1e-6 * np.abs(graddot).max())
    finally:
        stride_jax.methods.REGISTRY.pop("mymethod", None)
