"""Sharding of heads (M) and batch (B) over a device mesh equals the single-device computation.

The mesh tests need several devices. They run in ONE subprocess with 4 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4` must be set before JAX initialises, which
the main pytest process has already done): `_worker()` below computes every sharded quantity and
its single-device reference (the same arrays left on device 0, the same compiled code path) and
prints the max relative differences as JSON; the tests assert on them.

Tolerance: sharding only reorders sums: the head average becomes per-device partial sums plus an
all-reduce, and the batch mean of the loss likewise. A reordered sum of `k` float64 terms differs
by at most about `k * eps` relative to the sum of magnitudes (eps = 2.2e-16); with M = 8 heads,
L = 2 layers, a few steps per layer and O(1) amplification by the flow and a training step, the
bound is ~1e-14. We assert 1e-12 relative, 1e-14 absolute — still 1e6 below float32 round-off,
so a lost shard, a double-counted shard or a missing reduction would all fail it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import meanfield_tf as mf
from meanfield_tf import make_mesh
from meanfield_tf.workflow.config import MeshConfig

RTOL = 1e-12
NUM_DEVICES = 4


def _run_worker(case: str, timeout: float = 900.0) -> dict:  # a hang guard, not a speed test
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    # the worker imports the same meanfield_tf as this process (not another installed copy)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mf.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"worker {case!r} failed:\n{out.stderr[-4000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def core():
    """Mesh 2x2: forward, gradient, compiled collectives, training steps, errors (~25 s CPU)."""
    return _run_worker("core")


@pytest.fixture(scope="module")
def extended():
    """Meshes 4x1 and 1x4, adaptive solver, chunked kernel, finite differences, checkpoint
    resume across meshes (~70 s of CPU, mostly compilation)."""
    return _run_worker("extended")


# ---------------------------------------------------------------------------------------------
# Assertions (main process)


def test_worker_sees_four_devices(core):
    assert core["num_devices"] == NUM_DEVICES


def test_forward_flow_matches_single_device(core):
    r = core["forward"]["2x2"]
    assert r["err"] <= RTOL, r
    # the output stays split over the batch (no silent gather onto one device)
    assert r["x_spec"] == ["data", None, None], r


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["4x1", "1x4"])
def test_forward_flow_matches_single_device_other_meshes(extended, mesh):
    assert extended["forward"][mesh]["err"] <= RTOL, extended["forward"][mesh]


@pytest.mark.slow
def test_adaptive_solver_matches_single_device(extended):
    r = extended["adaptive"]
    assert r["err"] <= RTOL and r["steps_equal"], r


@pytest.mark.slow
def test_chunked_kernel_forward_and_gradient_match(extended):
    r = extended["chunked"]
    assert r["forward_err"] <= RTOL and r["grad_err"] <= RTOL, r


def test_gradient_matches_single_device(core):
    for mesh, r in core["gradient"].items():
        assert r["err"] <= RTOL, (mesh, r)
        # the gradient is sharded like the heads
        assert r["spec"] == [None, "heads", None, None], (mesh, r)


@pytest.mark.slow
def test_gradient_and_training_match_on_other_meshes(extended):
    for mesh in ("4x1", "1x4"):
        g, t = extended["gradient"][mesh], extended["train"][mesh]
        assert g["err"] <= RTOL and g["spec"] == [None, "heads", None, None], (mesh, g)
        assert t["params_err"] <= RTOL and t["loss_err"] <= RTOL, (mesh, t)
        assert t["momentum_spec"] == [None, "heads", None, None], (mesh, t)


@pytest.mark.slow
def test_gradient_matches_finite_differences(extended):
    # an independent reference for the sharded gradient: float64 central differences
    r = extended["fd"]
    assert r["err"] <= r["tol"], r


def test_velocity_is_reduced_over_heads_not_gathered(core):
    # XLA computes per-device partial head sums and all-reduces them: no all-gather of heads
    r = core["hlo"]
    assert r["all_reduce"] >= 1 and r["all_gather"] == 0, r


def test_training_steps_match_single_device(core):
    for mesh, r in core["train"].items():
        assert r["params_err"] <= RTOL and r["loss_err"] <= RTOL, (mesh, r)
        assert r["params_spec"] == [None, "heads", None, None], (mesh, r)
        assert r["momentum_spec"] == [None, "heads", None, None], (mesh, r)


@pytest.mark.slow
def test_checkpoint_resumes_on_same_and_different_mesh(extended):
    for case, r in extended["resume"].items():
        assert r["params_err"] <= RTOL and r["state_err"] <= RTOL, (case, r)


@pytest.fixture(scope="module")
def layouts():
    """Every mesh of the grid (2x2, 4x1, 1x4): how gradients, optimiser state, the NTK Jacobian
    and a restored checkpoint are laid out (~20 small compiles, ~2.5 min of CPU)."""
    return _run_worker("layouts", timeout=1800.0)


HEADS_SPEC = [None, "heads", None, None]
MESH_GRID = ["2x2", "4x1", "1x4"]


def _heads_per_shard(mesh: str) -> int:
    return 8 // int(mesh.split("x")[0])  # M = 8 heads split over the heads axis


@pytest.mark.parametrize("mesh", MESH_GRID)
def test_gradients_are_sharded_like_the_heads_on_every_mesh(layouts, mesh):
    # every gradient route returns g with the heads' own sharding: the spec names the heads axis
    # (also where it has a single shard) and every device holds exactly M/H heads of it
    r = layouts[mesh]
    for route in ("flow_autodiff", "autodiff", "explicit"):
        for key, leaf in r[route].items():
            assert leaf["spec"] == HEADS_SPEC, (mesh, route, key, leaf)
            assert leaf["shard_heads"] == _heads_per_shard(mesh), (mesh, route, key, leaf)
    # the values are those of the single-device computation
    assert r["explicit_err"] <= RTOL, r


@pytest.mark.parametrize("mesh", MESH_GRID)
def test_optimiser_state_is_sharded_like_the_heads_on_every_mesh(layouts, mesh):
    # Adam's two moments and the parameters after two steps keep the head sharding; the step
    # count and the injected learning rate stay replicated; the steps equal one device's
    r = layouts[mesh]
    for name in ("params", "mu", "nu"):
        for key, leaf in r["adam"][name].items():
            assert leaf["spec"] == HEADS_SPEC, (mesh, name, key, leaf)
            assert leaf["shard_heads"] == _heads_per_shard(mesh), (mesh, name, key, leaf)
    assert r["adam"]["scalars_replicated"], r["adam"]
    assert r["adam"]["params_err"] <= RTOL and r["adam"]["state_err"] <= RTOL, r["adam"]
    # a checkpoint gathered to the host and restored on this mesh has the same layout
    for key, leaf in r["restored"].items():
        assert leaf["spec"] == HEADS_SPEC and leaf["shard_heads"] == _heads_per_shard(mesh), (
            mesh, key, leaf)


@pytest.mark.parametrize("mesh", MESH_GRID)
def test_ntk_jacobian_keeps_the_head_axis_sharded(layouts, mesh):
    # dY/dθ has shape (B, d, L, M, d, d): its M axis (3) stays split over the heads
    r = layouts[mesh]["ntk"]
    assert r["shard_heads"] == _heads_per_shard(mesh), r
    assert r["err"] <= RTOL, r


def test_bad_mesh_in_worker(core):
    msgs = core["errors"]
    assert "not divisible by mesh.heads=2" in msgs["heads"]
    assert "not divisible by mesh.data=2" in msgs["data"]
    assert "needs 8 devices but only 4" in msgs["devices"]
    assert all("\n" not in m for m in msgs.values())


@pytest.fixture(scope="module")
def training_runs():
    """`meanfield_tf.workflow.training.train` with a `mesh:` section, stopped and resumed (several compiles)."""
    return _run_worker("run")


@pytest.mark.slow
def test_sharded_training_run_resumes_on_same_and_different_mesh(training_runs):
    # a 2x2-sharded run of 4 steps, and 2x2 runs stopped after 2 steps and resumed on 2x2 and on
    # 4x1 (4 head shards) and 1x4 (4 data shards), all equal the uninterrupted one-device run
    assert training_runs.pop("mesh") == {"heads": 2, "data": 2}
    for case, r in training_runs.items():
        assert r["steps"] == 4, (case, r)
        assert r["params_err"] <= RTOL and r["state_err"] <= RTOL, (case, r)
        assert r["loss_err"] <= RTOL, (case, r)


# ---------------------------------------------------------------------------------------------
# Validation that needs no extra devices (main process)


def test_too_many_devices_is_one_line_input_error():
    with pytest.raises(mf.InputError, match=r"needs 64 devices but only \d+") as err:
        make_mesh(heads=8, data=8)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [{"heads": 0}, {"data": -1}, {"heads": 1.5}, {"data": True}])
def test_mesh_config_rejects_bad_values(bad):
    with pytest.raises(mf.ConfigError, match=r"mesh\.(heads|data) must be an integer >= 1"):
        MeshConfig(**bad)


def test_mesh_config_check_names_the_problem():
    cfg = MeshConfig(heads=2, data=4)
    assert cfg.num_devices == 8 and cfg.sharded
    cfg.check(num_heads=6, batch_size=8, num_devices=8)
    with pytest.raises(mf.ConfigError, match="number of heads M=5 is not divisible by mesh.heads=2"):
        cfg.check(num_heads=5, num_devices=8)
    with pytest.raises(mf.ConfigError, match="batch size B=6 is not divisible by mesh.data=4"):
        cfg.check(batch_size=6, num_devices=8)
    with pytest.raises(mf.ConfigError, match="needs 8 devices but only 2 are available"):
        cfg.check(num_devices=2)
    assert not MeshConfig().sharded


def test_single_device_mesh_is_a_no_op(getkey):
    mesh = make_mesh()
    heads = mf.gaussian_heads(getkey(), 2, 3, 2)
    tokens = mf.TokenBatch(np.random.default_rng(0).normal(size=(3, 4, 2)))
    ref = mf.flow(heads, tokens).x
    out = mf.flow(mf.shard_heads(heads, mesh), mf.shard_tokens(tokens, mesh)).x
    assert np.array_equal(np.asarray(out), np.asarray(ref))


# ---------------------------------------------------------------------------------------------
# The worker (runs in a subprocess with 4 CPU devices)


def _worker(case: str) -> dict:  # noqa: C901 - one place computing every sharded quantity
    import re
    import tempfile
    import time

    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    jax.config.update("jax_enable_x64", True)
    import meanfield_tf as mf
    from meanfield_tf import (gather_to_host, gradient_flow_optimizer, init_optimizer,
                              make_mesh, make_train_step, shard_heads, shard_like_heads,
                              shard_tokens)

    t_start = time.perf_counter()

    def tick(label):
        print(f"[{time.perf_counter() - t_start:7.2f}s] {label}", file=sys.stderr, flush=True)

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.abs(a - b).max() / np.abs(b).max())

    def tree_rel(a, b):
        return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def spec(arr):
        return [None if s is None else str(s) for s in arr.sharding.spec] + [None] * (
            arr.ndim - len(arr.sharding.spec))

    if case == "run":
        return _worker_run(tick, rel, tree_rel)
    if case == "layouts":
        return _worker_layouts(tick, rel, tree_rel, spec)

    res: dict = {"num_devices": len(jax.devices())}
    L, M, d, B, n = 2, 8, 2, 4, 5
    heads = mf.gaussian_heads(jax.random.key(0), L, M, d, dtype=jnp.float64)
    rng = np.random.default_rng(1)
    w = rng.uniform(0.2, 1.0, size=(B, n))
    w[:, -1] = 0.0  # a padding token in every sequence
    tokens = mf.TokenBatch(rng.normal(size=(B, n, d)), w / w.sum(1, keepdims=True))
    target = jnp.asarray(rng.normal(size=(B, n, d)))
    mesh = make_mesh(2, 2)
    sh, st = shard_heads(heads, mesh), shard_tokens(tokens, mesh)
    names = ["2x2"] if case == "core" else ["4x1", "1x4"]
    meshes = {name: make_mesh(*map(int, name.split("x"))) for name in names}

    def loss(h, t, kernel=mf.DenseKernel()):
        x1 = mf.flow(h, t, mf.DepthSolver(kernel=kernel)).x
        return 0.5 * jnp.mean(jnp.sum(t.w[..., None] * (x1 - target) ** 2, axis=(1, 2)))

    grad = jax.jit(jax.grad(loss))

    def mean_field_value_and_grad(h, t):  # g = L M dR/dθ, the project's training convention
        value, g = jax.value_and_grad(loss)(h, t)
        return value, jax.tree.map(lambda a: a * (L * M), g.params)

    # the project's optax gradient flow, with momentum so that the optimiser state holds
    # head-shaped arrays
    opt = gradient_flow_optimizer(0.05, base=optax.trace(decay=0.9))
    step = make_train_step(mean_field_value_and_grad, opt)

    def run(h, s, t, k):
        losses = []
        for _ in range(k):
            h, s, info = step(h, s, t)
            losses.append(info.loss)
        return h, s, np.asarray(losses)

    tick("forward")
    forward = jax.jit(lambda h, t: mf.flow(h, t))
    ref = forward(heads, tokens)
    res["forward"] = {}
    for name, m in meshes.items():
        hm, tm = shard_heads(heads, m), shard_tokens(tokens, m)
        if case == "core":  # the compiled collectives of the sharded forward pass
            txt = forward.lower(hm, tm).compile().as_text()
            res["hlo"] = {"all_reduce": len(re.findall(r"all-reduce(-start)?\(", txt)),
                          "all_gather": len(re.findall(r"all-gather(-start)?\(", txt))}
        out = forward(hm, tm)
        res["forward"][name] = {"err": max(rel(out.x, ref.x), rel(out.xs, ref.xs)),
                                "x_spec": spec(out.x)}

    tick("gradient")
    g_ref = grad(heads, tokens)
    res["gradient"] = {}
    for name, m in meshes.items():
        g = grad(shard_heads(heads, m), shard_tokens(tokens, m))
        res["gradient"][name] = {"err": tree_rel(g.params, g_ref.params),
                                 "spec": spec(g.params["A"])}

    tick("training steps")
    steps = 3
    h_ref, s_ref, l_ref = run(heads, init_optimizer(opt, heads), tokens, steps)
    res["train"] = {}
    for name, m in meshes.items():
        hs = shard_heads(heads, m)
        h1, s1, l1 = run(hs, shard_like_heads(init_optimizer(opt, hs), heads, m),
                         shard_tokens(tokens, m), steps)
        res["train"][name] = {"params_err": tree_rel(h1.params, h_ref.params),
                              "loss_err": rel(l1, l_ref), "params_spec": spec(h1.params["A"]),
                              "momentum_spec": spec(s1.inner_state[0].trace["A"])}

    if case == "core":
        tick("bad meshes")
        errs = {}
        try:
            shard_heads(mf.gaussian_heads(jax.random.key(0), 1, 3, 2), mesh)
        except mf.InputError as e:
            errs["heads"] = str(e)
        try:
            shard_tokens(mf.TokenBatch(np.ones((3, 2, 2))), mesh)
        except mf.InputError as e:
            errs["data"] = str(e)
        try:
            make_mesh(4, 2)
        except mf.InputError as e:
            errs["devices"] = str(e)
        res["errors"] = errs
        tick("done")
        return res

    tick("checkpoint")
    # 1 step on the 2x2 mesh, gather to host, save, load, re-shard on a mesh, 2 more steps
    h2, s2, _ = run(sh, shard_like_heads(init_optimizer(opt, sh), heads, mesh), st, 1)
    res["resume"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.eqx")
        eqx.tree_serialise_leaves(path, gather_to_host((h2, s2)))
        for name, m in {"2x2": mesh, **meshes}.items():
            h_l, s_l = eqx.tree_deserialise_leaves(path, (heads, init_optimizer(opt, heads)))
            h3, s3, _ = run(shard_heads(h_l, m), shard_like_heads(s_l, heads, m),
                            shard_tokens(tokens, m), steps - 1)
            res["resume"][f"2x2->{name}"] = {"params_err": tree_rel(h3.params, h_ref.params),
                                             "state_err": tree_rel(s3, s_ref)}

    tick("adaptive")
    lin = mf.gaussian_heads(jax.random.key(2), L, M, d, interpolation="linear", dtype=jnp.float64)
    kw = dict(solver=mf.DepthSolver(diffrax.Tsit5(), mf.AdaptiveSteps(1e-8, 1e-10)))
    a_ref = mf.flow(lin, tokens, **kw)
    a_out = mf.flow(shard_heads(lin, mesh), st, **kw)
    res["adaptive"] = {"err": rel(a_out.x, a_ref.x),
                       "steps_equal": bool(np.array_equal(a_out.num_steps, a_ref.num_steps))}

    tick("finite differences")
    # float64 central differences of the sharded loss along a random direction
    direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), heads.params)
    dd = sum(float(jnp.vdot(grad(sh, st).params[k], direction[k])) for k in direction)
    eps = 1e-5

    def moved(sign):
        p = jax.tree.map(lambda a, u: a + sign * eps * u, heads.params, direction)
        return shard_heads(eqx.tree_at(lambda h: h.params, heads, p), mesh)

    fd = (float(loss(moved(1), st)) - float(loss(moved(-1), st))) / (2 * eps)
    # truncation O(eps^2 |f^(3)|) ~ 1e-10 plus round-off O(eps_mach |f| / eps) ~ 1e-11
    res["fd"] = {"err": abs(fd - dd) / abs(dd), "tol": 1e-7}

    tick("chunked kernel")
    ck = mf.ChunkedKernel(chunk_size=2)
    c_ref = mf.flow(heads, tokens, mf.DepthSolver(kernel=ck)).x
    c_out = mf.flow(sh, st, mf.DepthSolver(kernel=ck)).x
    gc = jax.jit(jax.grad(lambda h, t: loss(h, t, ck)))
    res["chunked"] = {"forward_err": rel(c_out, c_ref),
                      "grad_err": tree_rel(gc(sh, st).params, gc(heads, tokens).params)}
    tick("done")
    return res


def _worker_layouts(tick, rel, tree_rel, spec) -> dict:
    """Layouts on every mesh of the grid: gradients (three routes), Adam state, NTK, restore."""
    import jax
    import jax.numpy as jnp
    import optax

    import meanfield_tf as mf
    from meanfield_tf import (Autodiff, Explicit, MeanFieldGradient, gather_to_host,
                              gradient_flow_optimizer, init_optimizer, make_train_step,
                              risk_and_gradient, shard_heads, shard_like_heads, shard_tokens)

    L, M, d, B, n = 2, 8, 2, 4, 5
    heads = mf.gaussian_heads(jax.random.key(0), L, M, d, dtype=jnp.float64)
    rng = np.random.default_rng(1)
    w = rng.uniform(0.2, 1.0, size=(B, n))
    tokens = mf.TokenBatch(rng.normal(size=(B, n, d)), w / w.sum(1, keepdims=True))
    risk = mf.TokenRegression(jnp.asarray(rng.normal(size=(B, n, d))))
    batch = mf.Batch(tokens, risk)
    readout = mf.ReadoutQuery(jnp.ones(d))

    def layout(arr):
        # the spec JAX reports, and how many heads one device really holds (axis 1)
        return {"spec": spec(arr), "shard_heads": int(arr.addressable_shards[0].data.shape[1])}

    def layouts(params):
        return {k: layout(v) for k, v in params.items()}

    def flow_loss(h, t):
        return risk(mf.flow(h, t).x, t.w)

    flow_grad = jax.jit(jax.grad(flow_loss))
    opt = gradient_flow_optimizer(0.05, base=optax.scale_by_adam())
    step = make_train_step(MeanFieldGradient(), opt)
    ntk = jax.jit(lambda h, t: mf.ntk_jacobian(h, t, output=readout)["A"])

    def adam(h, s, b):
        for _ in range(2):
            h, s, _ = step(h, s, b)
        return h, s

    def scale_state(s):
        # optax.chain(scale_by_adam, scale): the adam state is the first of the inner states
        return s.inner_state[0]

    tick("layouts: one-device references")
    ref = {
        "explicit": risk_and_gradient(heads, tokens, risk, method=Explicit())[1],
        "adam": adam(heads, init_optimizer(opt, heads), batch),
        "ntk": ntk(heads, tokens),
    }
    res: dict = {}
    for name in ("2x2", "4x1", "1x4"):
        tick(f"layouts: mesh {name}")
        m = make_mesh(*map(int, name.split("x")))
        hs, ts = shard_heads(heads, m), shard_tokens(tokens, m)
        bs = mf.Batch(ts, risk)  # the risk's targets stay replicated
        r: dict = {}
        r["flow_autodiff"] = layouts(flow_grad(hs, ts).params)
        r["autodiff"] = layouts(risk_and_gradient(hs, ts, risk, method=Autodiff())[1].params)
        g_exp = risk_and_gradient(hs, ts, risk, method=Explicit())[1]
        r["explicit"] = layouts(g_exp.params)
        r["explicit_err"] = tree_rel(g_exp.params, ref["explicit"].params)

        h2, s2 = adam(hs, shard_like_heads(init_optimizer(opt, hs), heads, m), bs)
        inner = scale_state(s2)
        scalars = [s2.hyperparams["learning_rate"], inner.count]
        r["adam"] = {
            "params": layouts(h2.params), "mu": layouts(inner.mu), "nu": layouts(inner.nu),
            "scalars_replicated": all(a.sharding.is_fully_replicated for a in scalars),
            "params_err": tree_rel(h2.params, ref["adam"][0].params),
            "state_err": tree_rel(s2, ref["adam"][1]),
        }
        host_h, host_s = gather_to_host((h2, s2))
        restored = shard_like_heads(host_s, heads, m)
        r["restored"] = {**layouts(shard_heads(host_h, m).params),
                         **{f"mu_{k}": layout(v) for k, v in scale_state(restored).mu.items()}}

        jac = ntk(hs, ts)
        r["ntk"] = {"spec": spec(jac), "shard_heads": int(jac.addressable_shards[0].data.shape[3]),
                    "err": rel(jac, ref["ntk"])}
        res[name] = r
    tick("done")
    return res


def _worker_run(tick, rel, tree_rel) -> dict:
    """Training runs through `meanfield_tf.workflow.training.train` (run directories, checkpoints, resume)."""
    import tempfile

    import jax

    from meanfield_tf.workflow.config import load_train_config
    from meanfield_tf.workflow.rundir import load_run
    from meanfield_tf.workflow.training import train

    base = ["dtype=float64", "heads.layers=2", "heads.heads=8", "train.learning_rate=0.5",
            "train.optimizer=momentum", "train.checkpoint_every=2", "train.eval_every=2",
            "train.log_every=1", "task.tokens.n=6"]

    def cfg(*extra):
        return load_train_config(None, base + list(extra))

    def final(path):
        _, _, state = load_run(path)
        return state

    def metrics(path):
        rows = [json.loads(x) for x in open(os.path.join(path, "metrics.jsonl"))]
        return np.asarray([r["loss"] for r in rows if r["kind"] == "train"])

    from meanfield_tf.workflow.build import run as build_run
    from meanfield_tf.workflow.processes import run_mesh

    c = cfg("mesh.heads=2", "mesh.data=2")
    res = {"mesh": dict(run_mesh(c.mesh, build_run(c).heads0.num_heads).shape)}  # the run really builds the mesh
    with tempfile.TemporaryDirectory() as tmp:
        tick("reference run (one device)")
        ref_dir = os.path.join(tmp, "ref")
        train(cfg("train.steps=4"), ref_dir, progress=False)
        ref = final(ref_dir)
        runs = {
            "2x2": ("mesh.heads=2 mesh.data=2", None),
            "2x2 stop, resume 2x2": ("mesh.heads=2 mesh.data=2", "mesh.heads=2 mesh.data=2"),
            "2x2 stop, resume 4x1": ("mesh.heads=2 mesh.data=2", "mesh.heads=4 mesh.data=1"),
            "2x2 stop, resume 1x4": ("mesh.heads=2 mesh.data=2", "mesh.heads=1 mesh.data=4"),
        }
        for i, (name, (first, second)) in enumerate(runs.items()):
            tick(name)
            path = os.path.join(tmp, f"run{i}")
            if second is None:
                train(cfg("train.steps=4", *first.split()), path, progress=False)
            else:
                train(cfg("train.steps=2", *first.split()), path, progress=False)
                train(cfg("train.steps=4", *second.split()), path, resume=True, progress=False)
            state = final(path)
            res[name] = {"steps": int(state.step),
                         "params_err": tree_rel(state.heads.params, ref.heads.params),
                         "state_err": tree_rel(jax.tree.leaves(state.opt_state),
                                               jax.tree.leaves(ref.opt_state)),
                         "loss_err": rel(metrics(path), metrics(ref_dir))}
    tick("done")
    return res


if __name__ == "__main__":
    print("RESULT " + json.dumps(_worker(sys.argv[1])))
