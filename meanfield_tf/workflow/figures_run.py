"""The figures of a training run (PNG, in the run directory's `figures/`):

- `loss.png`: the training loss against training time τ = Σ lr (steps on the top axis), the
  y-axis named for the task's risk (the Sinkhorn divergence for distribution matching); beside
  it the test loss (and test accuracy) where the task has a test set, and the conditional
  Wasserstein distance W2,c of the heads from their start. In-context regression draws the
  zero-predictor and least-squares baselines of the test set as horizontal lines.
- `particles.png`: every layer's head particles (small multiples), start and end joined by
  segments, projected on the two leading principal axes of the layer's pooled particles (the
  explained variance on the axis labels); teacher–student runs add the teacher's particles.
- `tokens_initial.png`, `tokens_trained.png`: token trajectories through the initial and the
  trained heads, sequences titled by family, the readout query starred, the targets drawn.
- digits: `confusion.png` (test-set confusion matrix) and `predictions.png` (test images with
  the predicted and true class).
- with `logging.ntk: true`: `ntk.png` (λ_min and λ_max of the readout NTK against τ, see
  `run_ntk.py`), and on `loss.png` of a full-batch run trained by plain gradient descent the
  predicted-rate line log R(τ₀) − 2 λ_min(K₀)(τ − τ₀)/N.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from .._tasks import Digits, DistributionMatching, InContextRegression, TeacherStudent
from .._training import layer_particles
from .figures import _pyplot, _save, plot_trajectories
from .run_ntk import plot_run_ntk, probe, rate_line


def _columns(rows, kind, *keys):
    rs = [r for r in rows if r.get("kind") == kind]
    return [np.array([r.get(k, np.nan) for r in rs], dtype=float) for k in keys]


def risk_label(run) -> str:
    """The name of the task's risk, for the y-axis."""
    t = run.cfg.task
    if t.name == "distribution_matching":
        return f"Sinkhorn divergence S_ε (ε = {t.epsilon:g})"
    if t.name == "digits":
        return "cross-entropy"
    return "squared error ½|ŷ − y|²"


def regression_baselines(batch, dim_x: int) -> dict[str, float]:
    """Test losses of predicting 0 and of per-sequence least squares on the context tokens
    (the in-context regression batch: tokens `(x_k, y_k)`, the query last)."""
    x = np.asarray(batch.tokens.x, float)
    y = np.asarray(batch.risk.y, float)[:, 0]
    X, Y, xq = x[:, :-1, :dim_x], x[:, :-1, -1], x[:, -1, :dim_x]
    pred = np.array([xq[b] @ np.linalg.lstsq(X[b], Y[b], rcond=None)[0] for b in range(len(y))])
    return {"zero predictor": float(np.mean(0.5 * y ** 2)),
            "least squares": float(np.mean(0.5 * (pred - y) ** 2))}


def _linear_map(x, xp, fp):
    """`np.interp(x, xp, fp)` continued past both ends at the mean slope: the step axis of the
    loss figure must stay invertible over the axis margins, where `np.interp` would be flat (a
    decayed learning rate's last segment would stretch the margin over millions of steps)."""
    x = np.asarray(x, float)
    slope = (fp[-1] - fp[0]) / (xp[-1] - xp[0])
    y = np.interp(x, xp, fp)
    y = np.where(x < xp[0], fp[0] + slope * (x - xp[0]), y)
    return np.where(x > xp[-1], fp[-1] + slope * (x - xp[-1]), y)


def _draws_rate(run) -> bool:
    """Whether `loss.png` draws the NTK's predicted rate: a full-batch readout-query regression
    trained by plain gradient descent (`run_ntk.probe`)."""
    ntk, _ = probe(run)
    return ntk is not None and ntk.draw_rate


def _clip_bottom(ax, values, baselines) -> None:
    """Keep the log axis on the data: a baseline far below it (an exact least-squares fit) stays
    in the legend with its value, off the axis."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return
    if not baselines and values.max() < 10 * values.min():  # under a decade: a linear axis
        ax.set_yscale("linear")
        return
    if not baselines:
        return
    lo = min(values.min(), *[v for v in baselines.values() if v > 0])
    ax.set_ylim(bottom=max(lo / 3, values.min() / 1e3))


def plot_run_loss(path, run, rows, baselines=None) -> Path:
    """`loss.png` (see the module docstring)."""
    plt = _pyplot()
    step, tau, loss, lr = _columns(rows, "train", "step", "time", "loss", "lr")
    # τ after the last step closes the axis; τ at any step by interpolation
    s_ext = np.append(step, step[-1] + 1) if len(step) else np.zeros(1)
    t_ext = np.append(tau, tau[-1] + lr[-1]) if len(step) else np.zeros(1)

    def tau_at(s):
        return np.interp(s, s_ext, t_ext)

    es, test_loss, test_acc, ew2 = _columns(rows, "eval", "step", "test_loss", "test_accuracy",
                                            "w2")
    ws, w2 = _columns(rows, "w2", "step", "w2")
    w2_pts = dict(zip(es.tolist(), ew2.tolist()))
    w2_pts.update(zip(ws.tolist(), w2.tolist()))
    has_test = np.isfinite(test_loss).any()
    n = 3 if has_test else 2
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2))
    ax = axes[0]
    pos = loss > 0
    ax.semilogy(tau[pos], loss[pos], lw=1.2, color="C0", label="training loss")
    for j, (name, v) in enumerate((baselines or {}).items()):
        for a in axes[:2 if has_test else 1]:
            a.axhline(max(v, 1e-300), color=f"C{j + 4}", ls=":", lw=1.2,
                      label=f"{name} (test set): {v:.3g}")
    line = rate_line(rows) if _draws_rate(run) else None
    if line is not None:
        ax.semilogy(line[0], line[1], "--", lw=1.2, color="C7",
                    label=f"NTK rate: log R(τ₀) − 2λ_min(K₀)(τ − τ₀)/N, slope {line[2]:.3g}")
    ax.set_xlabel("training time τ = Σ lr")
    ax.set_ylabel(f"training loss: {risk_label(run)}")
    ax.set_title("training loss")
    ax.grid(True, which="both", alpha=0.3)
    if len(step) > 1 and np.all(np.diff(t_ext) > 0):
        top = ax.secondary_xaxis("top", functions=(lambda t: _linear_map(t, t_ext, s_ext),
                                                   lambda s: _linear_map(s, s_ext, t_ext)))
        top.set_xlabel("step")
    _clip_bottom(ax, loss[pos], baselines)
    ax.legend(fontsize=7, loc="best")
    if has_test:
        ax = axes[1]
        ok = np.isfinite(test_loss)
        ax.semilogy(tau_at(es[ok]), test_loss[ok], "o-", ms=3, color="C1", label="test loss")
        _clip_bottom(ax, test_loss[ok], baselines)
        ax.set_xlabel("training time τ = Σ lr")
        ax.set_ylabel(f"test loss: {risk_label(run)}")
        ax.set_title("test set")
        ax.grid(True, which="both", alpha=0.3)
        if np.isfinite(test_acc).any():
            ax3 = ax.twinx()
            ax3.plot(tau_at(es), test_acc, "s-", ms=3, color="C2", label="test accuracy")
            ax3.set_ylabel("test accuracy")
            ax3.set_ylim(0, 1)
            ax3.legend(loc="center right", fontsize=7)
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    ks = np.array(sorted(w2_pts))
    ax.plot(tau_at(ks), [w2_pts[k] for k in ks], "-", marker="." if len(ks) < 60 else None,
            color="C3")
    ax.set_xlabel("training time τ = Σ lr")
    ax.set_ylabel("W2,c(ν_τ, ν_0)")
    ax.set_title("distance travelled by the heads")
    ax.grid(True, alpha=0.3)
    fig.suptitle(f"{run.cfg.name}: {run.cfg.task.name}")
    return _save(plt, fig, path)


def _pca(pooled):
    mean = pooled.mean(0)
    _, sv, vt = np.linalg.svd(pooled - mean, full_matrices=False)
    var = sv ** 2 / max(float((sv ** 2).sum()), 1e-300)
    basis = vt[:2].T
    if basis.shape[1] < 2:
        basis, var = np.pad(basis, ((0, 0), (0, 1))), np.pad(var, (0, 1))
    return mean, basis, var


def plot_layer_particles(path, start, end, teacher=None, *, max_layers: int = 16,
                         title: str = "") -> Path:
    """Small multiples, one per layer: particles `(N, M, p)` at the start (black), the end (red
    x), joined by grey segments, and the teacher's (blue +) when given; each layer projected on
    the two leading principal axes of its pooled particles."""
    plt = _pyplot()
    start, end = np.asarray(start, float), np.asarray(end, float)
    N = min(start.shape[0], max_layers)
    ncol = min(N, 4)
    nrow = -(-N // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(3.8 * ncol, 6.5), 3.6 * nrow + 0.4),
                             squeeze=False)
    for l in range(nrow * ncol):
        ax = axes[l // ncol][l % ncol]
        if l >= N:
            ax.axis("off")
            continue
        sets = [start[l], end[l]] + ([np.asarray(teacher[l], float)] if teacher is not None
                                     else [])
        mean, basis, var = _pca(np.concatenate(sets))
        pa, pb = (start[l] - mean) @ basis, (end[l] - mean) @ basis
        for m in range(pa.shape[0]):
            ax.plot([pa[m, 0], pb[m, 0]], [pa[m, 1], pb[m, 1]], color="0.65", lw=0.6)
        ax.scatter(pa[:, 0], pa[:, 1], s=12, c="k", label="student, start")
        ax.scatter(pb[:, 0], pb[:, 1], s=16, c="C3", marker="x", label="student, end")
        if teacher is not None:
            pt = (sets[2] - mean) @ basis
            ax.scatter(pt[:, 0], pt[:, 1], s=22, c="C0", marker="+", label="teacher")
        ax.set_xlabel(f"PC1 ({100 * var[0]:.0f}% var.)")
        ax.set_ylabel(f"PC2 ({100 * var[1]:.0f}% var.)")
        ax.set_title(f"layer {l}", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title or "head particles θ = (A, V), PCA per layer", fontsize=10)
    return _save(plt, fig, path)


def family_titles(specs) -> list[str]:
    """One title per sequence from family specs (`copies` expanded)."""
    from .config import expand_copies

    out = []
    for _, spec in expand_copies(specs):
        extra = {"gaussian": f"mean {spec.get('mean')}", "ball": f"radius {spec.get('radius')}",
                 "box": f"{spec.get('low')}–{spec.get('high')}",
                 "mixture": f"{len(spec.get('weights', []))} components",
                 "discrete": f"{len(spec.get('atoms', []))} atoms"}.get(spec["family"], "")
        out.append(f"{spec['family']} {extra}".strip())
    return out


def _token_view(run, batch, max_sequences=8):
    """`(tokens, titles, targets, dims, target_label)` of the token plots of a run's task."""
    task, t = run.task, run.cfg.task
    tokens = jax.tree.map(lambda a: a[:max_sequences], batch.tokens)
    y = np.asarray(batch.risk.y)[:max_sequences] if hasattr(batch.risk, "y") else None
    if isinstance(task, TeacherStudent):
        return tokens, family_titles(t.tokens.families), y, (0, 1), "teacher's output"
    if isinstance(task, DistributionMatching):
        return tokens, [f"{a}\n→ target {b}" for a, b in zip(family_titles(t.tokens.families),
                                                            family_titles(t.targets))], \
            y, (0, 1), "target measure"
    if isinstance(task, InContextRegression):
        xq = np.asarray(tokens.x)[:, -1].copy()
        xq[:, -1] = y[:, 0]
        return tokens, [f"regression sequence {b}" for b in range(len(xq))], xq, (0, -1), \
            "query target (x_q, ⟨β, x_q⟩)"
    if isinstance(task, Digits):
        labels = np.asarray(batch.risk.labels)[:max_sequences]
        return tokens, [f"digit {c}" for c in labels], None, (1, 0), ""
    return tokens, None, None, (0, 1), ""  # pragma: no cover


def plot_digits(rd, run, heads) -> list[Path]:
    """`confusion.png` on the test set and `predictions.png`: 12 test images with their
    predicted and true classes."""
    plt = _pyplot()
    batch = run.task.test_batch()
    logits = np.asarray(batch.risk.logits(run.forward(heads, batch.tokens)))
    pred, true = logits.argmax(-1), np.asarray(batch.risk.labels)
    C = logits.shape[1]
    conf = np.zeros((C, C), int)
    np.add.at(conf, (true, pred), 1)
    fig, ax = plt.subplots(figsize=(5.6, 5))
    im = ax.imshow(conf, cmap="Blues")
    for i in range(C):
        for j in range(C):
            if conf[i, j]:
                ax.text(j, i, conf[i, j], ha="center", va="center", fontsize=7,
                        color="w" if conf[i, j] > conf.max() / 2 else "k")
    ax.set_xticks(range(C))
    ax.set_yticks(range(C))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"test confusion matrix (accuracy {np.mean(pred == true):.3f}, "
                 f"{len(true)} images)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    paths = [_save(plt, fig, rd.figure_dir / "confusion.png")]
    x = np.asarray(batch.tokens.x)[:, :64, 2]
    fig, axes = plt.subplots(2, 6, figsize=(10, 4))
    for k, ax in enumerate(axes.flat):
        ax.imshow(x[k].reshape(8, 8), cmap="gray_r")
        ax.set_title(f"pred {pred[k]} / true {true[k]}", fontsize=9,
                     color="C2" if pred[k] == true[k] else "C3")
        ax.axis("off")
    fig.suptitle("test images: predicted / true class")
    paths.append(_save(plt, fig, rd.figure_dir / "predictions.png"))
    return paths


def write_run_figures(rd, run, heads) -> list[Path]:
    """Every figure of a training run (see the module docstring)."""
    rows = rd.read_metrics()
    baselines = None
    if isinstance(run.task, InContextRegression):
        baselines = regression_baselines(run.task.test_batch(), run.cfg.task.dim_x)
    paths = [plot_run_loss(rd.figure_dir / "loss.png", run, rows, baselines)]
    teacher = None
    if isinstance(run.task, TeacherStudent):
        from .build import teacher_heads

        teacher = np.asarray(layer_particles(teacher_heads(run.cfg, run.heads0)))
    paths.append(plot_layer_particles(
        rd.figure_dir / "particles.png", np.asarray(layer_particles(run.heads0)),
        np.asarray(layer_particles(heads)), teacher,
        title="head particles θ = (A, V) by layer, PCA per layer"
              + (": student and teacher" if teacher is not None else "")))
    batch = run.task.test_batch() or run.batch(run.data_key, 0)
    tokens, titles, targets, dims, target_label = _token_view(run, batch)
    for name, h in (("initial", run.heads0), ("trained", heads)):
        s, xs = run.trajectory(h, tokens)
        paths.append(plot_trajectories(
            rd.figure_dir / f"tokens_{name}.png", xs, tokens.w, s, titles=titles,
            targets=targets, dims=dims, target_label=target_label,
            title=f"token trajectories through the {name} heads"))
    if isinstance(run.task, Digits):
        paths += plot_digits(rd, run, heads)
    if any(r.get("kind") == "ntk" for r in rows):
        paths.append(plot_run_ntk(rd.figure_dir / "ntk.png", run, rows))
    return paths
