"""Every registered method runs through the job on tiny data (the quick variants)."""

import numpy as np

from stride_jax import baselines, benchmark


def test_every_method_runs_end_to_end(tiny, tmp_path):
    tiny.methods = tuple(sorted(baselines.REGISTRY))
    tiny.baselines.trak.update(num_models=2, proj_dim=64)
    tiny.baselines.trak1.proj_dim = 64
    tiny.baselines.datamodel.update(num_models=8, models_per_batch=4)
    results = benchmark.run(tiny, str(tmp_path))
    assert set(results["methods"]) == set(baselines.REGISTRY)
    for name, entry in results["methods"].items():
        assert np.isfinite(entry["lds"]), name
        assert set(entry["seconds_split"]) == {"fit", "score"}, name
        assert entry["peak_mb"] >= 0, name
        scores = np.load(tmp_path / f"scores_{name}.npy")
        assert scores.shape == (16, 120) and np.isfinite(scores).all(), name
    assert -1 <= results["noise_ceiling"]["lds"] <= 1
    assert (tmp_path / "lds.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert all(name in table for name in results["methods"])
