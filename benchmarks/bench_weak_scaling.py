"""Weak scaling of the sharded flow: work per device fixed, devices 1 -> N.

With `--axis heads` (default) every device holds `--heads-per-device` particles per layer, so
`M = heads_per_device * k` on `k` devices (mesh `heads=k, data=1`); with `--axis data` every device
holds `--batch-per-device` sequences (mesh `heads=1, data=k`). Perfect weak scaling keeps the time
constant; `efficiency = t(1) / t(k)`.

Runs on whatever devices JAX sees (GPUs, or several hosts). On a CPU-only machine pass
`--cpu-devices N` to simulate N devices (they share the machine's cores, so the CPU numbers test
the harness and the communication pattern, not speed-up).

    python benchmarks/bench_weak_scaling.py --cpu-devices 4 --out weak.json
    python benchmarks/bench_weak_scaling.py --axis data --grad     # on a GPU node

Writes a JSON file (config, devices, one row per device count) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--axis", choices=["heads", "data"], default="heads",
                   help="which axis grows with the device count")
    p.add_argument("--heads-per-device", type=int, default=16)
    p.add_argument("--batch-per-device", type=int, default=4)
    p.add_argument("--heads", type=int, default=16, help="M when --axis data")
    p.add_argument("--batch", type=int, default=4, help="B when --axis heads")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--grad", action="store_true", help="also time the gradient of a loss")
    p.add_argument("--max-devices", type=int, default=None, help="default: all devices")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulate this many CPU devices (sets XLA_FLAGS before JAX starts)")
    p.add_argument("--out", default="weak_scaling.json")
    return p.parse_args(argv)


def device_counts(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(compile + first run, median of `repeats` further runs) in seconds."""
    import jax
    import numpy as np

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        if "jax" in sys.modules:
            raise SystemExit("--cpu-devices must be set before JAX is imported")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import meanfield_tf as mf

    dtype = jnp.dtype(args.dtype)
    devices = jax.devices()
    n_max = min(args.max_devices or len(devices), len(devices))
    forward = jax.jit(lambda h, t: mf.flow(h, t).x)

    def loss(h, t):
        return 0.5 * jnp.mean(jnp.sum(t.w[..., None] * mf.flow(h, t).x ** 2, axis=(1, 2)))

    grad = jax.jit(jax.grad(loss))
    rows = []
    for k in device_counts(n_max):
        if args.axis == "heads":
            M, B, shape = args.heads_per_device * k, args.batch, (k, 1)
        else:
            M, B, shape = args.heads, args.batch_per_device * k, (1, k)
        mesh = mf.make_mesh(*shape, devices=devices[:k])
        heads = mf.gaussian_heads(jax.random.key(0), args.layers, M, args.dim, dtype=dtype)
        x = jax.random.normal(jax.random.key(1), (B, args.tokens, args.dim), dtype)
        tokens = mf.TokenBatch(x)
        sh, st = mf.shard_heads(heads, mesh), mf.shard_tokens(tokens, mesh)
        first, fwd = timed(forward, sh, st, repeats=args.repeats)
        row = {"devices": k, "mesh": {"heads": shape[0], "data": shape[1]}, "M": M, "B": B,
               "forward_s": fwd, "forward_first_s": first}
        if args.grad:
            first_g, g = timed(grad, sh, st, repeats=args.repeats)
            row.update(grad_s=g, grad_first_s=first_g)
        rows.append(row)
    base_f = rows[0]["forward_s"]
    for r in rows:
        r["forward_efficiency"] = base_f / r["forward_s"]
        if args.grad:
            r["grad_efficiency"] = rows[0]["grad_s"] / r["grad_s"]

    result = {
        "benchmark": "weak_scaling",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "num_processes": jax.process_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print_table(result)
        print(f"wrote {args.out}")
    return 0


def print_table(result) -> None:
    rows = result["rows"]
    grad = "grad_s" in rows[0]
    print(f"weak scaling over {result['config']['axis']} on {result['num_devices']} "
          f"{result['platform']} device(s) ({result['device_kind']})")
    head = f"{'devices':>7} {'mesh':>6} {'M':>6} {'B':>5} {'forward ms':>11} {'eff':>6}"
    if grad:
        head += f" {'grad ms':>10} {'eff':>6}"
    print(head)
    for r in rows:
        line = (f"{r['devices']:>7} {r['mesh']['heads']}x{r['mesh']['data']:<4} {r['M']:>6} "
                f"{r['B']:>5} {1e3 * r['forward_s']:>11.2f} {r['forward_efficiency']:>6.2f}")
        if grad:
            line += f" {1e3 * r['grad_s']:>10.2f} {r['grad_efficiency']:>6.2f}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
