"""The notebook side of the API: ``datasets.from_arrays`` / ``from_texts``, the ``verbose`` and
``set_verbosity`` logging switches, and ``evaluate.lds_from_retrains``."""

import logging as py_logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from flax import nnx

import stride_jax
from stride_jax import logs
from stride_jax.data import DataError, load_npz
from stride_jax.eval import metrics


def _arrays(seed=0, n=30, q=6, f=4):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.normal(size=(n, f)).astype(np.float32),
        "y_train": np.arange(n) % 3,
        "x_query": rng.normal(size=(q, f)).astype(np.float32),
        "y_query": np.arange(q) % 3,
        "ids_train": np.arange(100, 100 + n),
    }


def _same_splits(a, b):
    assert (a.name, a.num_classes, a.val) == (b.name, b.num_classes, b.val)
    for part in ("train", "query"):
        for field in ("x_NxF", "y_N", "ids_N"):
            x, y = getattr(getattr(a, part), field), getattr(getattr(b, part), field)
            assert x.dtype == y.dtype and np.array_equal(x, y), (part, field)


def test_from_arrays_equals_the_npz_loader(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "mine.npz", **arrays)
    _same_splits(
        stride_jax.datasets.from_arrays(**arrays, name="mine"), load_npz(str(tmp_path / "mine.npz"))
    )
    splits = stride_jax.datasets.from_arrays(*(arrays[k] for k in list(arrays)[:4]))
    assert splits.name == "arrays" and list(splits.train.ids_N) == list(range(30))
    assert isinstance(splits, stride_jax.Splits)


def _bad_inputs():
    a = _arrays
    yield "x_train 1-D", a() | {"x_train": np.zeros(30)}
    yield "features differ", a() | {"x_query": np.zeros((6, 5))}
    yield "label count", a() | {"y_train": np.arange(29) % 3}
    yield "float labels", a() | {"y_train": np.full(30, 0.5)}
    yield "negative label", a() | {"y_train": np.arange(30) % 3 - 1}
    yield "one class", a() | {"y_train": np.zeros(30, int)}
    yield "unseen query label", a() | {"y_query": np.full(6, 7)}
    yield "NaN", a() | {"x_train": np.full((30, 4), np.nan)}
    yield "string features", a() | {"x_query": np.full((6, 4), "a")}
    yield "duplicate ids", a() | {"ids_train": np.zeros(30, int)}
    yield "ids shape", a() | {"ids_train": np.arange(5)}
    yield "empty queries", a() | {"x_query": np.zeros((0, 4)), "y_query": np.zeros(0, int)}


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=[c[0] for c in _bad_inputs()])
def test_from_arrays_refuses_what_the_npz_loader_refuses_with_its_message(tmp_path, case):
    _, arrays = case
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as from_file:
        load_npz(str(tmp_path / "bad.npz"))
    with pytest.raises(DataError) as from_memory:
        stride_jax.datasets.from_arrays(**arrays)
    assert str(from_memory.value) == str(from_file.value)


def test_from_arrays_validation_split():
    a = _arrays()
    del a["ids_train"]
    splits = stride_jax.datasets.from_arrays(**a, x_val=np.ones((3, 4)), y_val=[0, 1, 2])
    assert splits.val.x_NxF.dtype == np.float32 and list(splits.val.y_N) == [0, 1, 2]
    with pytest.raises(DataError, match="x_val has 5 features but x_train has 4"):
        stride_jax.datasets.from_arrays(**a, x_val=np.ones((3, 5)), y_val=[0, 1, 2])
    with pytest.raises(DataError, match="y_val has label 3 but y_train only has labels 0..2"):
        stride_jax.datasets.from_arrays(**a, x_val=np.ones((3, 4)), y_val=[0, 1, 3])
    with pytest.raises(DataError, match="both x_val and y_val"):
        stride_jax.datasets.from_arrays(**a, x_val=np.ones((3, 4)))


def test_from_texts_tokenizes_plain_and_prompt_response_texts():
    train = ["to be or not to be", ("Q: who? ", "A: the king"), "my kingdom for a horse"]
    splits = stride_jax.datasets.from_texts(train, ["good night"], "char", block_len=16)
    assert splits.train.num_examples == 3 and splits.query.num_examples == 1
    # each text has 18 to 22 characters: two rows of 16 per example, summed back by example
    assert list(splits.train.example_id_N) == [0, 0, 1, 1, 2, 2]
    assert splits.train.example_keys == ("train0", "train1", "train2")
    with pytest.raises(DataError, match=r"train_texts\[1\] must be a string or a"):
        stride_jax.datasets.from_texts(["ok", 3], ["q"], "char", block_len=16)
    with pytest.raises(DataError, match="query_texts is empty"):
        stride_jax.datasets.from_texts(["ok"], [], "char", block_len=16)


# --- logging -------------------------------------------------------------------------------


class _Linear(nnx.Module):
    def __init__(self, key):
        self.out = nnx.Linear(4, 3, rngs=nnx.Rngs(params=key))

    def __call__(self, x):
        return self.out(x)


@pytest.fixture(scope="module")
def tiny_task():
    s = stride_jax.datasets.from_arrays(**_arrays())
    recipe = stride_jax.tasks.adamw_recipe(_Linear, steps=10)
    x, y = jnp.asarray(s.train.x_NxF), jnp.asarray(s.train.y_N)
    params = recipe(jax.random.key(0), x, y, jnp.ones(len(y)))
    model = nnx.merge(nnx.split(_Linear(jax.random.key(0)), nnx.Param)[0], params)
    return stride_jax.tasks.classifier(
        model, train=(x, y), queries=(s.query.x_NxF, s.query.y_N), retrain=recipe
    )


def _logging_state():
    handler = logging.get_absl_handler()
    return (
        logging.get_verbosity(),
        py_logging.root.level,
        logging.get_absl_logger().level,
        list(py_logging.root.handlers),
        list(handler.filters),
    )


@pytest.fixture
def quiet_session(monkeypatch):
    """Each test starts with no set_verbosity call and leaves none behind."""
    before = _logging_state()
    monkeypatch.setattr(logs, "_default", None)
    monkeypatch.setattr(logs, "_installed", logs._Changes())
    yield
    logs.set_verbosity("warning")  # undo what a test's set_verbosity changed
    monkeypatch.undo()
    assert _logging_state()[3:] == before[3:]
    logging.set_verbosity(before[0])


def _info_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("I") and "] " in line]


def test_verbose_prints_this_packages_info_lines_and_restores_logging(
    tiny_task, quiet_session, capfd
):
    before = _logging_state()
    scores = stride_jax.attribute(tiny_task, method="graddot", verbose=True)
    lines = _info_lines(capfd.readouterr().err)
    assert any("attribute: graddot on 6 query rows x 30 training rows" in x for x in lines)
    assert any("attribute: graddot done" in x for x in lines), lines
    assert _logging_state() == before

    stride_jax.attribute(tiny_task, method="graddot", verbose=False)
    assert _info_lines(capfd.readouterr().err) == []
    assert _logging_state() == before

    res = stride_jax.evaluate.lds(tiny_task, scores, num_models=2, n_boot=10, verbose=True)
    assert any("lds: retraining 2 models" in x for x in _info_lines(capfd.readouterr().err))
    assert res["ground_truth"]["losses_MxQ"].shape == (2, 6)
    assert _logging_state() == before


def test_info_from_elsewhere_stays_quiet_and_nothing_prints_twice(quiet_session, capfd):
    py_logging.basicConfig()  # what absl does on its first line outside a binary
    with logs.verbosity(True):
        py_logging.getLogger("some.library").info("not ours")
        logging.info("not ours either")  # logged from tests/, not the package
        py_logging.getLogger("some.library").warning("a warning from elsewhere")
    err = capfd.readouterr().err
    assert "not ours" not in err and err.count("a warning from elsewhere") == 1, err


def test_set_verbosity_is_the_default_of_verbose_none(tiny_task, quiet_session, capfd):
    stride_jax.attribute(tiny_task, method="random")  # verbose=None: on before set_verbosity
    assert _info_lines(capfd.readouterr().err)
    stride_jax.set_verbosity("warning")
    stride_jax.attribute(tiny_task, method="random")
    assert _info_lines(capfd.readouterr().err) == []
    stride_jax.set_verbosity("info")
    stride_jax.attribute(tiny_task, method="random", verbose=False)  # one call silenced
    assert _info_lines(capfd.readouterr().err) == []
    assert logging.get_verbosity() == logging.INFO  # the session setting is back after it
    with pytest.raises(ValueError, match="verbosity must be"):
        stride_jax.set_verbosity("loud")


# --- LDS from one's own retrains -----------------------------------------------------------


def _retrains(seed=0, q=5, n=40, m=30):
    rng = np.random.default_rng(seed)
    true_QxN = rng.normal(size=(q, n))
    masks_MxN = rng.random((m, n)) < 0.5
    losses_MxQ = -(masks_MxN @ true_QxN.T) + 0.5 * rng.normal(size=(m, q))
    return true_QxN + rng.normal(size=(q, n)), masks_MxN, losses_MxQ


@pytest.mark.parametrize("kind", ["spearman", "pearson", "kendall"])
def test_lds_from_retrains_equals_metrics_lds(kind):
    scores, masks, losses = _retrains()
    got = stride_jax.evaluate.lds_from_retrains(scores, masks, losses, n_boot=50, kind=kind)
    want = metrics.lds(scores, masks, losses, n_boot=50, kind=kind)
    assert got["lds"] == want["lds"] and got["ci95"] == want["ci95"] and got["lds"] > 0.2
    np.testing.assert_array_equal(got["per_query"], want["per_query"])
    as_01 = stride_jax.evaluate.lds_from_retrains(scores, masks.astype(int), losses, n_boot=50)
    assert as_01["num_valid"] == 5


def test_lds_from_retrains_names_the_mismatch():
    scores, masks, losses = _retrains()
    lds = stride_jax.evaluate.lds_from_retrains
    with pytest.raises(ValueError, match=r"N \(training examples\).* are 40 vs 39"):
        lds(scores, masks[:, :39], losses)
    with pytest.raises(ValueError, match=r"M \(retrained models\).* are 30 vs 29"):
        lds(scores, masks, losses[:29])
    with pytest.raises(ValueError, match=r"Q \(queries\).* are 5 vs 4"):
        lds(scores, masks, losses[:, :4])
    with pytest.raises(
        ValueError, match=r"losses_MxQ has 1 NaN or inf entries \(first at \[2, 3\]\)"
    ):
        lds(scores, masks, np.where(np.arange(150).reshape(30, 5) == 13, np.nan, losses))
    with pytest.raises(ValueError, match="scores_QxN must be a non-empty 2-D array"):
        lds(scores[:0], masks, losses)
    with pytest.raises(ValueError, match="masks_MxN must be a non-empty 2-D array"):
        lds(scores, masks[0], losses)
    with pytest.raises(ValueError, match="masks_MxN must be boolean"):
        lds(scores, masks * 2, losses)
