"""The `meanfield-tf experiment` framework: registry, strict overrides, run directory, report."""

import json

import pytest

from meanfield_tf import ConfigError
from meanfield_tf.cli import main
from meanfield_tf.experiments import NAMES, get, list_experiments
from meanfield_tf.experiments._runner import coerce, resolve_config

TINY_MFL = ["layers=2,8", "heads=4,16", "ref_heads=2000", "ref_steps=8", "--seeds", "3"]


def test_registry_order_and_names():
    assert NAMES == ("mean-field-limit", "gaussian-limit", "adjoint", "injectivity",
                     "convergence", "width-depth", "clustering")
    listed = list_experiments()
    assert [n for n, _ in listed] == list(NAMES)
    mod = get("mean_field_limit")
    assert mod.NAME == "mean-field-limit" and get("mean-field-limit") is mod
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        get("nope")


def test_list_command(capsys):
    assert main(["experiment", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(NAMES)
    for line, name in zip(out, NAMES):
        assert line.startswith(name)


def test_overrides_are_strict_and_typed():
    mod = get("mean-field-limit")
    cfg = resolve_config(mod, quick=True, seeds=3, overrides={"layers": "2,8", "sigma_V": "1"})
    assert cfg.layers == (2, 8) and cfg.sigma_V == 1.0 and isinstance(cfg.sigma_V, float)
    assert cfg.seeds == 3 and cfg.heads == mod.QUICK["heads"]  # quick, then --seeds, then k=v
    # an override beats --quick
    assert resolve_config(mod, quick=True, overrides={"seeds": "2"}).seeds == 2
    with pytest.raises(ConfigError, match="unknown key 'bogus'.*known keys: seed, seeds"):
        resolve_config(mod, overrides={"bogus": "1"})
    with pytest.raises(ConfigError, match="seeds must be an integer"):
        resolve_config(mod, overrides={"seeds": "2.5"})
    with pytest.raises(ConfigError, match="must be true or false"):
        coerce("flag", bool, "1")
    assert coerce("x", tuple[float, ...], "[1, 2.5]") == (1.0, 2.5)
    with pytest.raises(ConfigError, match="finite number"):
        coerce("x", float, "abc")


@pytest.mark.parametrize("args, fragment", [
    (["bogus=1"], "unknown key 'bogus'"),
    (["seeds=x"], "seeds must be an integer"),
    (["layers"], "is not key=value"),
    (["--seeds", "0"], "--seeds must be >= 1"),
])
def test_bad_override_one_line_exit_2(tmp_path, capsys, args, fragment):
    rc = main(["experiment", "run", "mean-field-limit", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and fragment in err
    assert err.startswith("meanfield-tf experiment: error:")
    assert not (tmp_path / "r").exists()  # nothing written before validation


def test_unknown_experiment_and_run_all_unknown_key(tmp_path, capsys):
    assert main(["experiment", "run", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert main(["experiment", "run", "all", "--out", str(tmp_path / "b"), "zzz=1"]) == 2
    assert "no experiment has it" in capsys.readouterr().err


def test_refuses_foreign_nonempty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("data")
    assert main(["experiment", "run", "mean-field-limit", "--out", str(tmp_path)]) == 2
    assert "not empty and is not a run directory" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "data"
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"experiment": "adjoint"}))
    assert main(["experiment", "run", "mean-field-limit", "--out", str(other)]) == 2


def test_run_and_report_round_trip(tmp_path, capsys):
    run_dir = tmp_path / "mfl"
    assert main(["experiment", "run", "mean-field-limit", "--out", str(run_dir), *TINY_MFL]) == 0
    cap = capsys.readouterr()
    assert "rms_error" in cap.out and "L*M" in cap.out  # the printed table
    for f in ("config.yaml", "manifest.json", "progress.log", "results.json",
              "figures/error_vs_LM.png"):
        assert (run_dir / f).is_file(), f
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["experiment"] == "mean-field-limit" and man["status"] == "done"
    assert man["command"].startswith("meanfield-tf experiment run mean-field-limit --seeds 3")
    assert man["machine"]["cpu_count"] >= 1 and man["wall_seconds"] > 0
    log = (run_dir / "progress.log").read_text()
    assert "L=  8 M=   16" in log and log.count("\n") >= 5
    assert "L=  8 M=   16" in cap.err  # progress goes to stderr too
    # re-running into the same experiment's directory is allowed
    assert main(["experiment", "run", "mean-field-limit", "--out", str(run_dir), *TINY_MFL]) == 0
    capsys.readouterr()

    md, figs = tmp_path / "docs" / "results.md", tmp_path / "docs" / "figures"
    assert main(["experiment", "report", str(run_dir), "--out", str(md),
                 "--figures", str(figs)]) == 0
    text = md.read_text()
    res = json.loads((run_dir / "results.json").read_text())
    assert "## mean-field-limit" in text
    assert "| L | M | L*M | rms_error | stderr |" in text
    for row in res["table"]:
        assert f"| {row['L']} | {row['M']} | {row['L'] * row['M']} | {row['rms_error']:.4g} |" in text
    assert "](figures/mean-field-limit-error_vs_LM.png)" in text
    assert (figs / "mean-field-limit-error_vs_LM.png").is_file()
    assert man["command"] in text and f"{man['machine']['cpu_count']}-core" in text
    assert f"{res['slope']:.3f}" in text  # the discussion, generated from the numbers


def test_report_rejects_non_run_dir(tmp_path, capsys):
    assert main(["experiment", "report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert "not an experiment run directory" in err and len(err.strip().splitlines()) == 1
