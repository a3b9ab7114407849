"""`meanfield-tf compare` and `meanfield-tf train --sweep ... --seeds K`."""

import json

import numpy as np
import pytest

from meanfield_tf.cli import main
from meanfield_tf.workflow.sweep import parse_sweep, plan

TINY = ["dtype=float64", "heads.layers=2", "heads.heads=4", "task.tokens.n=4", "train.steps=4",
        "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=4"]


def _png_is_drawn(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200
    colours = np.unique((img[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)
    assert len(colours) > 20 and img[..., :3].std() > 0.02


def test_compare_overlays_and_names_the_differences(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--quiet", "--out", str(a), *TINY]) == 0
    assert main(["train", "--quiet", "--out", str(b), *TINY, "train.learning_rate=0.5",
                 "seed=3"]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    said = capsys.readouterr().out
    assert "config keys that differ: seed, train.learning_rate" in said
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["differences"] == {"seed": [0, 3], "train.learning_rate": [2.0, 0.5]}
    # the final metrics are those of the metrics file (independent reading of the JSON lines)
    rows = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rows if r["kind"] == "train"][-1]
    last_eval = [r for r in rows if r["kind"] == "eval"][-1]
    fb = report["runs"][1]["final"]
    assert fb["loss"] == last_train["loss"] and fb["w2"] == last_eval["w2"] and fb["step"] == 4
    assert fb["time"] == pytest.approx(4 * 0.5)  # τ = Σ lr, constant schedule
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| train.learning_rate | 2.0 | 0.5 |" in md
    _png_is_drawn(tmp_path / "cmp" / "compare.png")


def test_sweep_plan_names_and_seeds():
    grid = parse_sweep(["train.learning_rate=0.5,1", "heads.heads=4,6"])
    assert grid == [("train.learning_rate", [0.5, 1]), ("heads.heads", [4, 6])]
    runs = plan(None, ["seed=10"], grid, seeds=2)
    assert len(runs) == 8
    assert [s for _, s, _ in runs[:2]] == [10, 11]
    assert runs[-1][2].heads.heads == 6 and runs[-1][2].train.learning_rate == 1
    assert runs[-1][2].name == "teacher_student-train.learning_rate=1,heads.heads=6,seed=11"
    from meanfield_tf import ConfigError

    with pytest.raises(ConfigError, match="drop --seeds"):
        plan(None, [], parse_sweep(["seed=1,2"]), seeds=2)
    with pytest.raises(ConfigError, match="must look like"):
        parse_sweep(["train.learning_rate"])


def test_sweep_runs_the_grid_and_aggregates(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["train", *TINY, "--sweep", "train.learning_rate=0.5,2.0", "--seeds", "2",
                 "--out", str(out)]) == 0
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == [f"train.learning_rate={lr},seed={s}" for lr in (0.5, 2.0) for s in (0, 1)]
    summary = json.loads((out / "sweep.json").read_text())
    assert [p["values"] for p in summary["points"]] == [{"train.learning_rate": 0.5},
                                                         {"train.learning_rate": 2.0}]
    for point in summary["points"]:
        finals = []
        for run in point["runs"]:
            rows = [json.loads(x) for x in open(f"{run}/metrics.jsonl")]
            finals.append([r for r in rows if r["kind"] == "train"][-1]["loss"])
        # mean and standard error across the two seeds, recomputed here
        assert point["loss_mean"] == pytest.approx(np.mean(finals), rel=1e-12)
        assert point["loss_sem"] == pytest.approx(abs(finals[0] - finals[1]) / 2, rel=1e-9)
        assert point["seeds"] == [0, 1]
    assert "| 0.5 | 2 |" in (out / "sweep.md").read_text()
    _png_is_drawn(out / "sweep.png")
