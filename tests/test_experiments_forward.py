"""Experiments 1-3 at tiny sizes: the property each one shows, and its results.json contract."""

import pytest

from meanfield_tf.experiments import get
from meanfield_tf.experiments._runner import resolve_config


def _run(name, tmp_path, **overrides):
    mod = get(name)
    cfg = resolve_config(mod, overrides=overrides)
    lines = []
    results = mod.run(cfg, tmp_path, lines.append)
    assert lines, "experiments report progress"
    return mod, results


def test_mean_field_limit_rate(tmp_path):
    # the error is the Monte-Carlo fluctuation of L*M i.i.d. heads: slope -1/2 in L*M
    mod, res = _run("mean-field-limit", tmp_path, layers="2,8", heads="4,64", seeds="12",
                    ref_heads="4000", ref_steps="16")
    assert set(res) >= {"tokens", "table", "slope", "constant"}
    assert len(res["tokens"]) == 8 and len(res["tokens"][0]) == 2
    assert [(r["L"], r["M"]) for r in res["table"]] == [(2, 4), (2, 64), (8, 4), (8, 64)]
    for r in res["table"]:
        assert set(r) == {"L", "M", "rms_error", "stderr"} and r["stderr"] > 0
    assert abs(res["slope"] + 0.5) <= 3 * res["slope_stderr"], res
    assert res["slope_stderr"] < 0.1
    # the constant agrees with the one predicted from the head law alone
    assert abs(res["constant"] / res["predicted_constant"] - 1) < 0.25
    assert res["reference_check"]["passes"]
    assert (tmp_path / "figures" / "error_vs_LM.png").is_file()
    assert mod.rows(res) and f"{res['slope']:.3f}" in mod.discussion(res)


def test_gaussian_limit_rate(tmp_path):
    mod, res = _run("gaussian-limit", tmp_path, ns="64,256,1024", seeds="6")
    assert set(res) >= {"table", "slope_cov"}
    assert [r["n"] for r in res["table"]] == [64, 256, 1024]
    for r in res["table"]:
        assert {"n", "w2", "mean_error", "cov_error"} <= set(r)
        assert r["w2"] > 0
    assert abs(res["slope_cov"] + 0.5) <= 3 * res["slope_cov_stderr"], res
    assert res["depth_error"] < 1e-2 * min(r["cov_error"] for r in res["table"])
    # W2 decreases with n
    w2 = [r["w2"] for r in res["table"]]
    assert w2[0] > w2[1] > w2[2]
    assert (tmp_path / "figures" / "errors_vs_n.png").is_file()


def test_adjoint_explicit_formula(tmp_path):
    mod, res = _run("adjoint", tmp_path, seeds="1", layers="2", heads="2", num_tokens="4",
                    rtols="1e-4,1e-9", directions="3", ref_steps="128", grid="5",
                    slice_layer="1")
    assert set(res) >= {"table", "ablation_rel_error"}
    err = {(r["method"], r["rtol"]): r["rel_error"] for r in res["table"]}
    assert set(r["method"] for r in res["table"]) == {"autodiff", "backsolve", "explicit"}
    assert err[("explicit", 1e-9)] < 1e-6 and err[("autodiff", 1e-9)] < 1e-6
    assert err[("explicit", 1e-9)] < err[("explicit", 1e-4)]
    assert res["ablation_rel_error"] > 0.05
    assert res["reference_check"]["rk4_steps_halved_change"] < 1e-7
    for f in ("rel_error_vs_rtol.png", "gradient_field.png"):
        assert (tmp_path / "figures" / f).is_file()
