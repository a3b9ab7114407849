"""Error of each kernel and precision policy against float64: `python -m benchmarks.precision_errors`.

Standard case: B = 2 sequences of n = 128 tokens in d = 16 (standard normal, non-uniform
weights, 8 padding tokens each), L = 4 layers of M = 16 heads, A ~ N(0, 1/d^2)·2, V ~ N(0, 1/d).
Reference: `DenseKernel` in float64. Each kernel runs on float32 inputs with the policy, and
reports max-relative errors (max |err| / max |ref|) of:

- `velocity`: one layer's velocity v(X_0);
- `flow`: the displacement X_1 - X_0 of the L-layer Euler flow;
- `grad A`, `grad V`: the gradient of mean(|X_1|^2) w.r.t. (A, V).

Prints a Markdown table (with the platform: on CPU, tf32 is float32 and bf16 is emulated).
"""

from __future__ import annotations

import argparse
import datetime
import platform

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meanfield_tf import (  # noqa: E402
    PRECISIONS, ChunkedKernel, CudnnKernel, DenseKernel, PallasKernel)


def problem(B=2, n=128, d=16, L=4, M=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, n, d))
    w = rng.uniform(0.2, 1.0, size=(B, n))
    w[:, -8:] = 0
    w /= w.sum(axis=1, keepdims=True)
    A = 2 * rng.normal(size=(L, M, d, d)) / d
    V = rng.normal(size=(L, M, d, d)) / np.sqrt(d)
    return tuple(jnp.asarray(a, jnp.float64) for a in (A, V, x, w))


def batch_velocity(kernel):
    return kernel.velocity


def flow(kernel, A, V, x, w):
    vel = batch_velocity(kernel)
    L = A.shape[0]
    return jax.lax.scan(lambda x, AV: (x + vel(x, w, AV[0], AV[1]) / L, None), x, (A, V))[0]


def quantities(kernel, A, V, x, w):
    v = batch_velocity(kernel)(x, w, A[0], V[0])
    disp = flow(kernel, A, V, x, w) - x
    gA, gV = jax.grad(lambda A, V: jnp.mean(flow(kernel, A, V, x, w) ** 2), argnums=(0, 1))(A, V)
    return v, disp, gA, gV


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-pallas", action="store_true", help="skip the (slow on CPU) Pallas kernel")
    args = ap.parse_args(argv)
    data = problem()
    ref = quantities(DenseKernel(), *data)
    data32 = tuple(a.astype(jnp.float32) for a in data)
    rows = []
    contenders = [("dense", "float32", DenseKernel()), ("chunked", "float32", ChunkedKernel(64))]
    for name, policy in PRECISIONS.items():
        contenders.append(("cudnn", name, CudnnKernel(precision=policy)))
        if not args.no_pallas:
            contenders.append(("pallas", name, PallasKernel(precision=policy)))
    for kname, pname, kernel in contenders:
        got = jax.jit(lambda *a, k=kernel: quantities(k, *a))(*data32)
        rows.append((kname, pname, *(rel(g, r) for g, r in zip(got, ref))))
    dev = jax.devices()[0]
    print(f"{platform.processor() or platform.machine()} {dev.platform} ({dev.device_kind}), "
          f"{datetime.date.today()}, jax {jax.__version__}, `python -m benchmarks.precision_errors`")
    print("| kernel | precision | velocity | flow X_1 - X_0 | grad A | grad V |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | " + " | ".join(f"{e:.1e}" for e in r[2:]) + " |")


if __name__ == "__main__":
    main()
