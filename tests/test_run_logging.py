"""What a run records beyond its metrics: the NTK at checkpoints (against a Gram built by a plain
loop of gradients), the predicted-rate line of the loss figure, the TensorBoard copy of the
metrics (read back from the event file's records), and the strict `logging` keys."""

import json
import struct

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield_tf as mf
from meanfield_tf import ConfigError
from meanfield_tf.workflow import build, figures_run
from meanfield_tf.workflow.config import load_train_config
from meanfield_tf.workflow.rundir import RunDir
from meanfield_tf.workflow.run_ntk import probe, rate_line
from meanfield_tf.workflow.training import train

TINY = ["dtype=float64", "heads.layers=2", "heads.heads=8", "task.tokens.n=6",
        "train.learning_rate=2.0", "train.steps=10", "train.log_every=1", "train.eval_every=5",
        "train.checkpoint_every=5", "train.w2_every=5"]


def _loop_gram(heads, tokens_q, readout=None):
    """$K = LM \\sum_{l,m} \\partial Y \\partial Y^T$ by one `jax.grad` per scalar output
    $Y_{i,c} = (P x^i_e(1))_c$ through the finite transformer, then `eigvalsh`."""
    solver = mf.DepthSolver(diffrax.Euler(), mf.FixedSteps(1), mf.DenseKernel())
    P = jnp.eye(tokens_q.dim) if readout is None else readout

    @jax.jit
    @jax.grad
    def grad_y(params, i, c):
        h = eqx.tree_at(lambda hh: hh.params, heads, params)
        return (mf.flow(h, tokens_q, solver).x[i, -1] @ P.T)[c]

    rows = []
    for i in range(tokens_q.batch_size):
        for c in range(P.shape[0]):
            g = grad_y(heads.params, i, c)
            rows.append(np.concatenate([np.asarray(g[k]).ravel() for k in sorted(g)]))
    J = np.stack(rows)
    K = heads.num_layers * heads.num_heads * J @ J.T
    return np.linalg.eigvalsh(K)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    pytest.importorskip("tensorboardX")
    out = tmp_path_factory.mktemp("logged") / "run"
    cfg = load_train_config(None, [*TINY, "logging.ntk=true", "logging.tensorboard=true"])
    train(cfg, out, progress=False, figures=False)
    return cfg, out


def test_ntk_rows_match_a_direct_gram_at_start_and_end(logged_run):
    cfg, out = logged_run
    rd = RunDir(out)
    rows = [r for r in rd.read_metrics() if r["kind"] == "ntk"]
    assert [r["step"] for r in rows] == [0, 5, 10]
    run = build.run(cfg)
    tokens_q = run.task.batch.tokens
    state = rd.load_newest(run.initial_state())[0]
    assert int(state.step) == 10
    for row, heads in ((rows[0], run.heads0), (rows[-1], state.heads)):
        ev = _loop_gram(heads, tokens_q)
        assert row["lambda_min"] > 0
        np.testing.assert_allclose(row["lambda_min"], ev[0], rtol=1e-9)
        np.testing.assert_allclose(row["lambda_max"], ev[-1], rtol=1e-9)
        assert row["num_sequences"] == 4
        np.testing.assert_allclose(row["predicted_slope"], -2 * ev[0] / 4, rtol=1e-9)
    assert rows[-1]["time"] == pytest.approx(10 * 2.0)
    assert rows[0]["lambda_min"] != rows[-1]["lambda_min"]  # the NTK moved with the heads


def test_loss_figure_draws_the_predicted_rate(logged_run, monkeypatch):
    cfg, out = logged_run
    rows = RunDir(out).read_metrics()
    ntk0 = next(r for r in rows if r["kind"] == "ntk" and r["step"] == 0)
    train_rows = [r for r in rows if r["kind"] == "train"]
    drawn = {}
    monkeypatch.setattr(figures_run, "_save", lambda plt, fig, path: drawn.setdefault("fig", fig))
    figures_run.plot_run_loss(out / "loss.png", build.run(cfg), rows)
    lines = [ln for ln in drawn["fig"].axes[0].get_lines()
             if ln.get_label().startswith("NTK rate")]
    assert len(lines) == 1
    tau = np.array([r["time"] for r in train_rows])
    expected = train_rows[0]["loss"] * np.exp(-2 * ntk0["lambda_min"] / 4 * tau)
    np.testing.assert_allclose(lines[0].get_xdata(), tau)
    np.testing.assert_allclose(lines[0].get_ydata(), expected, rtol=1e-12)
    assert rate_line(rows)[2] == ntk0["predicted_slope"]


def _event_scalars(path) -> dict[tuple[str, int], float]:
    """Every scalar of a TensorBoard event file, read record by record (length, CRC, Event
    proto, CRC)."""
    from tensorboardX.proto import event_pb2

    data, pos, out = path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for v in event.summary.value:
            out[(v.tag, event.step)] = v.simple_value
    return out


def test_tensorboard_scalars_match_the_metrics(logged_run):
    _, out = logged_run
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    got = _event_scalars(files[0])
    want = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k, v in r.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                want[(f"{r['kind']}/{k}", r["step"])] = float(np.float32(v))
    assert {"train/loss", "eval/w2", "ntk/lambda_min"} <= {t for t, _ in want}
    assert got == want


def test_tensorboard_without_the_extra_is_refused_before_the_run(tmp_path, monkeypatch):
    from meanfield_tf.workflow import tensorboard

    monkeypatch.setattr(tensorboard.importlib.util, "find_spec", lambda name: None)
    cfg = load_train_config(None, [*TINY, "logging.tensorboard=true"])
    with pytest.raises(ConfigError, match=r"pip install 'meanfield-tf\[tensorboard\]'"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("override, message", [
    ("logging.bogus=1", "unknown key 'logging.bogus'"),
    ("logging.ntk=often", "logging.ntk must be"),
])
def test_logging_keys_are_strict(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [override])


def test_ntk_probe_applies_to_readout_query_regression_only():
    tokens = build.run(load_train_config(None, [*TINY, "task.readout=tokens"]))
    got, why = probe(tokens)
    assert got is None and "logging.ntk skipped" in why and "readout: tokens" in why
    icr = build.run(load_train_config(None, ["dtype=float64", "task.name=in_context_regression",
                                             "heads.dim=3", "heads.layers=2", "heads.heads=4",
                                             "task.n=4", "task.batch_size=3"]))
    got, why = probe(icr)
    assert why == "" and not got.draw_rate and got.num_sequences == 3
    row = got.measure(icr.heads0)  # the prediction is the last coordinate only: (B, 1) outputs
    ev = _loop_gram(icr.heads0, got.batch.tokens, got.batch.risk.readout)
    assert len(ev) == 3
    np.testing.assert_allclose([row["lambda_min"], row["lambda_max"]], [ev[0], ev[-1]], rtol=1e-9)
