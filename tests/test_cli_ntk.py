"""`meanfield-tf ntk`: the report contract, a dependent and an independent case, bad configs."""

import json

import numpy as np
import pytest

from meanfield_tf.cli import main

TESTS = ("mod_affine", "mod_constants", "hessian", "ntk")

# Four Gaussians in d = 2 (more than d(d+1)/2 = 3: dependent modulo affine) and a discrete one.
DEPENDENT = """
sequences:
  - {family: gaussian, mean: [0, 0], cov: [[1, 0], [0, 1]]}
  - {family: gaussian, mean: [1, 0], cov: [[2, 0.5], [0.5, 1]]}
  - {family: gaussian, mean: [0, 1], cov: [[0.5, 0], [0, 1.5]]}
  - {family: gaussian, mean: [1, 1], cov: [[1, -0.3], [-0.3, 0.7]]}
  - {family: discrete, atoms: [[0, 0], [1, 0], [0, 2]], weights: [0.2, 0.3, 0.5]}
num_samples: 64
seed: 1
"""


def _check_contract(report, num_sequences):
    for name in TESTS:
        entry = report[name]
        assert isinstance(entry["ratio"], float)
        assert isinstance(entry["independent"], bool)
        assert isinstance(entry["threshold"], float) and entry["threshold"] > 0
        assert len(entry["null_vector"]) == num_sequences
        assert entry["independent"] == (entry["ratio"] > entry["threshold"])
    assert set(report["ntk"]["blocks"]) == {"A", "V", "full"}
    assert report["agree"] is True


def test_dependent_config_report_and_plot(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(DEPENDENT)
    out, png = tmp_path / "r.json", tmp_path / "s.png"
    assert main(["ntk", "--config", str(cfg), "--out", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    _check_contract(report, 5)
    for name in ("mod_affine", "hessian", "ntk"):
        assert not report[name]["independent"]
        c = np.array(report[name]["null_vector"])
        assert np.all(np.abs(c[:4]) > 1e-3) and abs(c[4]) < 1e-8  # names the four Gaussians
        covs = [np.eye(2), [[2, 0.5], [0.5, 1]], [[0.5, 0], [0, 1.5]], [[1, -0.3], [-0.3, 0.7]]]
        assert np.abs(sum(ci * np.array(s) for ci, s in zip(c, covs))).max() < 1e-12
    assert report["mod_constants"]["independent"]
    assert report["ntk"]["source"] == "exact_lse"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_independent_tokens_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 2))
    w = rng.uniform(0.5, 1.5, size=(4, 6))
    w[0, -1] = 0.0  # padding
    w /= w.sum(1, keepdims=True)
    np.savez(tmp_path / "t.npz", x=x, w=w)
    out = tmp_path / "r.json"
    assert main(["ntk", "--tokens", str(tmp_path / "t.npz"), "--out", str(out),
                 "--num-samples", "64", "--z-scale", "0.8"]) == 0
    report = json.loads(out.read_text())
    _check_contract(report, 4)
    assert all(report[name]["independent"] for name in TESTS)
    assert report["ntk"]["source"] == "flow"
    assert report["settings"]["num_samples"] == 64 and report["settings"]["z_scale"] == 0.8
    assert "tests agree: True" in capsys.readouterr().out


def test_num_tokens_certifies_the_sampled_sequences(tmp_path):
    """With num_tokens, the (exactly dependent) Gaussians become generic empirical sequences."""
    cfg = tmp_path / "c.yaml"
    text = DEPENDENT.replace("  - {family: discrete, atoms: [[0, 0], [1, 0], [0, 2]], "
                             "weights: [0.2, 0.3, 0.5]}\n", "")
    cfg.write_text(text + "num_tokens: 6\n")
    out = tmp_path / "r.json"
    assert main(["ntk", "--config", str(cfg), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    _check_contract(report, 4)
    assert all(report[name]["independent"] for name in TESTS)
    assert report["ntk"]["source"] == "flow"


@pytest.mark.parametrize("yaml_text, needle", [
    ("sequences: [{family: box, low: [0, 0], high: [1, 1]}]\nbogus: 1\n", "unknown key 'bogus'"),
    ("sequences: [{family: box, low: [0, 0], high: [1, 1], radius: 2}]\n",
     "unknown key sequences[0].radius"),
    ("sequences: [{family: cube, side: 1}]\n", "sequences[0].family 'cube' is unknown"),
    ("sequences: [{family: ball, center: [0, 0]}]\n", "lacks key radius"),
    ("sequences: []\n", "at least one sequence"),
    ("sequences: [{family: ball, center: [0, 0], radius: 1}]\nnum_samples: many\n",
     "num_samples must be an integer"),
    ("sequences: [{family: ball, center: [0, 0], radius: 1}]\nnum_heads: 3\n", "num_heads"),
    ("sequences: [{family: ball, center: [0, 0], radius: 1}, {family: ball, center: [0], "
     "radius: 1}]\n", "same dimension"),
    ("sequences: [oops\n", "not valid YAML"),
])
def test_bad_config_one_line_error(tmp_path, capsys, yaml_text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    rc = main(["ntk", "--config", str(cfg), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r.json").exists()


def test_tokens_and_config_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ntk", "--tokens", "t.npz", "--config", "c.yaml"])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
