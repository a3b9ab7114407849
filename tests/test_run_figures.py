"""The figures of a training run: every expected file exists and is drawn (not blank)."""

from pathlib import Path

import numpy as np
import pytest

from meanfield_tf.cli import main

COMMON = ["train.steps=3", "train.log_every=1", "train.eval_every=2", "train.w2_every=1",
          "train.checkpoint_every=3", "heads.heads=4", "heads.layers=2"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = ["loss.png", "particles.png", "tokens_initial.png", "tokens_trained.png"]
CASES = {
    "teacher_student": (["task.tokens.n=5", "logging.ntk=true"], BASE + ["ntk.png"]),
    "teacher_student_tokens": (["task.tokens.n=5"], BASE),
    "in_context_regression": (["task.n=6", "task.batch_size=4", "task.test_size=8",
                               "logging.ntk=true"], BASE + ["ntk.png"]),
    "digits": (["task.batch_size=4", "heads.layers=1"], BASE + ["confusion.png",
                                                                 "predictions.png"]),
    "distribution_matching": (["task.tokens.n=6", "task.target_n=6"], BASE),
}


def drawn(path) -> bool:
    """A PNG with a real drawing: large, many distinct colours, and visible contrast."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    colours = np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    return img.shape[0] > 200 and img.shape[1] > 200 and len(colours) > 30 and img.std() > 0.03


@pytest.mark.parametrize("name", list(CASES))
def test_run_figures_exist_and_are_drawn(name, tmp_path):
    extra, expected = CASES[name]
    out = tmp_path / name
    assert main(["train", "--quiet", "--config", str(CONFIGS / f"{name}.yaml"), "--out", str(out),
                 *COMMON, *extra]) == 0
    for fig in expected:
        path = out / "figures" / fig
        assert path.is_file(), fig
        assert drawn(path), fig


def test_blank_figure_is_not_drawn(tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(4, 4))
    fig.savefig(tmp_path / "blank.png")
    plt.close(fig)
    assert not drawn(tmp_path / "blank.png")


def test_step_axis_map_continues_past_the_ends():
    """The loss figure's step axis (steps against τ) stays invertible over the axis margins:
    inside it interpolates, outside it continues at the mean slope (np.interp would be flat)."""
    from meanfield_tf.workflow.figures_run import _linear_map

    tau = np.array([0.0, 2.0, 3.0, 3.5])  # a decaying step size
    step = np.array([0.0, 1.0, 2.0, 3.0])
    x = np.array([-1.0, 0.0, 2.5, 3.5, 4.0])
    mean = 3.0 / 3.5
    np.testing.assert_allclose(_linear_map(x, tau, step),
                               [-mean, 0.0, 1.5, 3.0, 3.0 + 0.5 * mean], rtol=1e-15)
    np.testing.assert_allclose(_linear_map(_linear_map(x, tau, step), step, tau), x, rtol=1e-15)
