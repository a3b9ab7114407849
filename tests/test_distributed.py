"""Multi-process runs: two processes on localhost (jax.distributed, gloo CPU collectives) compute
the same flow, gradient and training step as one process.

Each worker process has 2 simulated CPU devices, so the two together form a global mesh of 4
devices (`heads=2 x data=2`): the head axis is split *across* the processes, and the head
average needs a cross-process all-reduce. Both processes build the same host data from the same
seeds, shard it onto the global mesh, and gather the results (`gather_to_host`, a collective).
Process 0 also computes the single-device reference on one of its local devices (the same code,
no sharding, no communication) and writes both as JSON.

Tolerance as in `test_sharding.py`: sharding only reorders float64 sums, so 1e-12 relative.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import free_port, two_process_env

import meanfield_tf as mf
from meanfield_tf.workflow.config import DistributedConfig
from meanfield_tf.workflow.processes import initialize_distributed

RTOL = 1e-12


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "result.json"
    port = free_port()
    procs = []
    for pid in range(2):
        env = two_process_env(pid, port)
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=600)  # a hang guard, not a speed test
            logs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, err) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} failed:\n{err[-4000:]}"
    return json.loads(out.read_text())


def test_two_processes_form_one_mesh(two_processes):
    r = two_processes
    assert r["num_processes"] == 2 and r["global_devices"] == 4 and r["local_devices"] == 2
    # the heads axis spans the two processes: each process holds half of the particles
    assert r["heads_shard_shape"] == [2, 4, 2, 2]


def test_two_processes_forward_matches_single_process(two_processes):
    assert two_processes["forward_err"] <= RTOL, two_processes


def test_two_processes_gradient_matches_single_process(two_processes):
    assert two_processes["grad_err"] <= RTOL, two_processes


def test_two_processes_training_step_matches_single_process(two_processes):
    assert two_processes["train_err"] <= RTOL, two_processes
    assert two_processes["loss_err"] <= RTOL, two_processes


# ---------------------------------------------------------------------------------------------
# Configuration (main process; nothing is initialised)


def test_nothing_configured_stays_single_process():
    info = initialize_distributed(DistributedConfig(), env={})
    assert info.num_processes == 1 and info.process_id == 0 and info.is_main
    assert not DistributedConfig().resolve({}).enabled


def test_environment_fills_unset_fields_and_config_wins():
    env = {"MEANFIELD_TF_COORDINATOR_ADDRESS": "10.0.0.1:1234",
           "MEANFIELD_TF_NUM_PROCESSES": "4", "MEANFIELD_TF_PROCESS_ID": "3"}
    cfg = DistributedConfig().resolve(env)
    assert cfg.enabled and (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == (
        "10.0.0.1:1234", 4, 3)
    cfg = DistributedConfig(process_id=1).resolve(env)
    assert cfg.process_id == 1
    assert not DistributedConfig(enabled=False).resolve(env).enabled


@pytest.mark.parametrize("bad, match", [
    ({"coordinator_address": "localhost"}, "must look like host:port"),
    ({"coordinator_address": "h:0"}, "must look like host:port"),
    ({"num_processes": 0}, "num_processes must be >= 1"),
    ({"num_processes": 2, "process_id": 2}, "process_id=2 must be < num_processes=2"),
    ({"cpu_collectives": "nccl"}, "cpu_collectives must be one of"),
])
def test_bad_distributed_config_is_one_line_config_error(bad, match):
    with pytest.raises(mf.ConfigError, match=match) as err:
        DistributedConfig(**bad)
    assert "\n" not in str(err.value)


def test_bad_environment_is_config_error():
    with pytest.raises(mf.ConfigError, match="MEANFIELD_TF_NUM_PROCESSES must be an integer"):
        DistributedConfig().resolve({"MEANFIELD_TF_NUM_PROCESSES": "two"})


def test_config_section_is_a_plain_dataclass():
    # the training config embeds it as a YAML section
    assert {f.name for f in dataclasses.fields(DistributedConfig)} >= {
        "coordinator_address", "num_processes", "process_id"}


# ---------------------------------------------------------------------------------------------
# The worker: one of the two processes


def _worker(out_path: str) -> None:
    import jax

    info = initialize_distributed()  # from the MEANFIELD_TF_* environment
    jax.config.update("jax_enable_x64", True)
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np

    import meanfield_tf as mf
    from meanfield_tf import gradient_flow_optimizer, init_optimizer, make_train_step

    L, M, d, B, n = 2, 8, 2, 4, 5
    heads = mf.gaussian_heads(jax.random.key(0), L, M, d, dtype=jnp.float64)
    rng = np.random.default_rng(1)
    tokens = mf.TokenBatch(rng.normal(size=(B, n, d)))
    target = np.asarray(rng.normal(size=(B, n, d)))
    mesh = mf.make_mesh(heads=2, data=2)
    # processes own different rows of the mesh: the head axis crosses the process boundary
    sh, st = mf.shard_heads(heads, mesh), mf.shard_tokens(tokens, mesh)

    def loss(h, t):
        x1 = mf.flow(h, t).x
        return 0.5 * jnp.mean(jnp.sum(t.w[..., None] * (x1 - target) ** 2, axis=(1, 2)))

    def value_and_grad(h, t):
        value, g = jax.value_and_grad(loss)(h, t)
        return value, jax.tree.map(lambda a: a * (L * M), g.params)

    forward = jax.jit(lambda h, t: mf.flow(h, t).x)
    grad = jax.jit(jax.grad(loss))
    opt = gradient_flow_optimizer(0.05)
    step = make_train_step(value_and_grad, opt)

    x_sh = mf.gather_to_host(forward(sh, st))
    g_sh = mf.gather_to_host(grad(sh, st).params)
    h1, _, info1 = step(sh, mf.shard_like_heads(init_optimizer(opt, sh), heads, mesh), st)
    p_sh, l_sh = mf.gather_to_host((h1.params, info1.loss))
    shard_shape = list(sh.params["A"].addressable_shards[0].data.shape)

    if info.process_id == 0:
        local = jax.local_devices()[0]
        hl, tl = jax.device_put((heads, tokens), local)
        x_ref = np.asarray(forward(hl, tl))
        g_ref = jax.tree.map(np.asarray, grad(hl, tl).params)
        h_ref, _, info_ref = step(hl, init_optimizer(opt, hl), tl)

        def rel(a, b):
            return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(b).max())

        res = {
            "num_processes": info.num_processes, "global_devices": info.global_devices,
            "local_devices": info.local_devices, "heads_shard_shape": shard_shape,
            "forward_err": rel(x_sh, x_ref),
            "grad_err": max(rel(g_sh[k], g_ref[k]) for k in g_ref),
            "train_err": max(rel(p_sh[k], h_ref.params[k]) for k in g_ref),
            "loss_err": rel(l_sh, info_ref.loss),
        }
        with open(out_path, "w") as f:
            json.dump(res, f)
    eqx.clear_caches()
    jax.distributed.shutdown()


def test_quiet_native_stdout_keeps_python_output_and_standard_error():
    """Native writes to file descriptor 1 (where gloo prints) are dropped; Python's prints and
    everything on standard error (native errors included) still come through."""
    code = ("import os, sys\n"
            "from meanfield_tf.workflow.processes import quiet_native_stdout\n"
            "print('before', flush=True)\n"
            "quiet_native_stdout()\n"
            "os.write(1, b'[Gloo] native chatter\\n')\n"
            "print('python report')\n"
            "os.write(2, b'native error\\n')\n"
            "print('python error', file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "before\npython report\n"
    assert out.stderr == "native error\npython error\n"


if __name__ == "__main__":
    _worker(sys.argv[1])
