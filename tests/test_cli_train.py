"""`meanfield-tf train | resume | eval`: bad configs stop before training, runs report results."""

import json

import pytest

from meanfield_tf.cli import main
from meanfield_tf.workflow.config import load_train_config

TINY = ["dtype=float64", "heads.layers=2", "heads.heads=8", "task.tokens.n=6",
        "train.learning_rate=2.0", "train.eval_every=10", "train.checkpoint_every=10"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.bogus=1"], "unknown key 'train.bogus'"),
        (["heads.layers=two"], "heads.layers must be an integer"),
        (["train.learning_rate=-0.1"], "train.learning_rate must be > 0"),
        (["train.steps=0"], "train.steps must be > 0"),
        (["task.name=mnist"], "task.name 'mnist' is unknown"),
        (["train.optimizer=lbfgs"], "train.optimizer must be one of"),
        (["dtype=float16"], "dtype must be float32 or float64"),
        (["heads.dim=3"], "families live in d=2 but heads.dim is 3"),
        (["solver.steps=3"], "not a positive multiple"),
        (["train.gradient=backsolve"], "backsolve with the constant-step euler solver"),
        (["task.name=digits", "heads.dim=2"], "set heads.dim=13"),
        (["train.steps"], "must look like section.key=value"),
    ],
)
def test_bad_config_is_one_line_exit_2(extra, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--quiet", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "checkpoints").exists()  # stopped before training


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    names = {"teacher_student", "teacher_student_tokens", "in_context_regression", "digits",
             "distribution_matching", "teacher_student_mlp"}
    for name in names:
        cfg = load_train_config(root / f"{name}.yaml")
        assert cfg.name == name
    # the built-in default is configs/teacher_student.yaml
    assert load_train_config(None) == load_train_config(root / "teacher_student.yaml")


def test_train_resume_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), *TINY, "train.steps=10"]) == 0
    text = capsys.readouterr().out
    assert "orders of magnitude" in text and str(out) in text
    # resume to a longer run with a smaller step size (no recompilation needed)
    assert main(["resume", "--quiet", str(out), "train.steps=20", "train.learning_rate=1.0"]) == 0
    text = capsys.readouterr().out
    assert "resuming" in text and "from step 10 to 20" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if r["kind"] == "train"}
    assert lrs[9] == 2.0 and lrs[10] == 1.0
    assert main(["eval", str(out)]) == 0
    text = capsys.readouterr().out
    assert "step 20" in text and "W2,c" in text
    assert json.loads((out / "eval.json").read_text())["step"] == 20


def test_divergence_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--quiet", "--out", str(out), *TINY, "train.steps=20",
                 "train.learning_rate=1e8"])
    err = capsys.readouterr().err
    assert code == 2 and "loss became" in err and len(err.strip().splitlines()) == 1
