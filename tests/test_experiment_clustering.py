"""The `clustering` experiment at tiny sizes: its results.json contract, its figures, and the
helpers that measure collapse."""

import numpy as np
import pytest

from meanfield_tf.experiments import clustering
from meanfield_tf.experiments._runner import run_experiment


def test_collapse_time_interpolates_log_diameter():
    t = np.array([0.0, 1.0, 2.0])
    # log D goes from log 1 to log 1e-3 between t = 1 and 2: it crosses log 1e-2 two thirds in
    assert clustering.collapse_time(t, np.array([2.0, 1.0, 1e-3]), 1e-2) == pytest.approx(5 / 3)
    assert clustering.collapse_time(t, np.array([2.0, 1.0, 0.5]), 1e-2) == np.inf
    assert clustering.collapse_time(t, np.array([1e-3, 1e-4, 1e-5]), 1e-2) == 0.0


def test_diameters_and_clusters():
    x = np.array([[1.0, 0, 0], [1.0, 0.01, 0], [-1.0, 0, 0], [0, 1.0, 0]])
    assert clustering.diameters(x[None])[0] == pytest.approx(np.sqrt(4 + 1e-4))
    assert clustering.num_clusters(x, 0.1) == 3
    assert clustering.num_clusters(x, 1.5) == 1  # chained through the point (0, 1, 0)


def test_quick_run_contract_and_figures(tmp_path):
    import matplotlib.image as mpimg

    out, res = run_experiment("clustering", tmp_path / "run", overrides={
        "seeds": "2", "num_tokens": "12", "betas": "1,9", "horizon": "60", "num_saves": "80",
        "rtol": "1e-7", "euler_step": "0.05", "euler_horizon": "20"})
    assert set(res) >= {"table", "threshold", "horizon"}
    assert res["threshold"] == 1e-2 and res["horizon"] == 60.0
    for row in res["table"]:
        assert set(row) >= {"beta", "collapse_time", "stderr", "final_diameter"}
    first = res["table"][0]
    assert first["beta"] == 1.0 and first["collapsed"] == 2
    assert 0 < first["collapse_time"] < 60 and first["stderr"] >= 0
    assert first["final_diameter"] < 1e-2
    assert res["sphere_error"] < 1e-5
    check = res["euler_check"]
    assert check["sphere_error"] < 1e-13 and check["compared"] == 2
    # normalised Euler with time step 0.05 approximates the continuous collapse times
    assert check["max_rel_difference"] < 0.1
    assert (out / "results.json").is_file()
    for name in ("sphere_trajectories.png", "diameter_vs_time.png", "collapse_time_vs_beta.png"):
        img = mpimg.imread(out / "figures" / name)
        assert img.shape[0] > 100 and img[..., :3].std() > 0.05, name  # not blank
    assert clustering.rows(res) and "β = 1" in clustering.discussion(res)
