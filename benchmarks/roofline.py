"""This machine's throughputs, measured by the suite itself, and the work of one evaluation.

- matmul: a square float32 `a @ b` (the best case the CPU's BLAS-like dot reaches), FLOP/s;
- exp: a compute-bound float32 `exp` — a 256 Ki-element (1 MiB, cache-resident) array pushed
  through `exp` 64 times in a `fori_loop`, exps/s: XLA's `jnp.exp`, and the native CPU kernel's
  own `exp` when it is built; the faster of the two is the bound (a roofline that a kernel can
  beat is no bound).

Exps and FMAs run on the same vector units of a CPU, so the ideal time of a kernel is the sum
`flops / F + exps / E` (not the max); the larger term names the bounding resource.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from meanfield_tf import native_kernel_status
from meanfield_tf._native_attention import native_exp_neg_abs


def _best(fn, *args, repeats=7):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def measure(quick: bool = False) -> dict:
    size = 512 if quick else 1024
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    t_mm = _best(jax.jit(lambda a: a @ a), a)
    n_exp, iters = 1 << 18, 64
    e = jnp.linspace(0.0, 1.0, n_exp, dtype=jnp.float32)
    exp_loop = jax.jit(lambda e: jax.lax.fori_loop(0, iters, lambda i, v: jnp.exp(-v), e))
    t_exp = _best(exp_loop, e)
    xla_exp = iters * n_exp / t_exp
    native_exp = None
    if native_kernel_status().available:  # our kernels' exp is faster than XLA's: the bound
        native_loop = jax.jit(lambda e: native_exp_neg_abs(e, iters))  # cache-resident repeats
        native_exp = iters * n_exp / _best(native_loop, e)
    return {"matmul_flops_per_s": 2 * size**3 / t_mm,
            "exp_per_s": max(xla_exp, native_exp or 0.0), "exp_per_s_xla": xla_exp,
            "exp_per_s_native": native_exp, "matmul_size": size, "exp_array": n_exp}


def velocity_work(B, n, d, M) -> dict:
    """FLOPs and exps of one velocity evaluation (all B sequences, M heads, n×n pairs).

    Per (head, query, key) pair: scores 2d flops, one exp, the weighted mean 2d flops; per
    (head, token): the query `A^T x` and the value `V y`, 2d² flops each.
    """
    pairs = B * M * n * n
    return {"flops": 4 * d * pairs + 4 * B * M * n * d * d, "exps": pairs}


def gradient_work(B, n, d, M) -> dict:
    """Minimal FLOPs and exps of forward + backward of one velocity evaluation.

    Backward from stored probabilities: `dp`, `dz`, the value and key cotangents, 2d flops
    per pair each (8d); no exp. (Our memory-linear VJP recomputes the scores on top: +2d flops
    and +1 exp per pair — counted against it, not added to the ideal.)
    """
    fwd = velocity_work(B, n, d, M)
    pairs = B * M * n * n
    return {"flops": fwd["flops"] + 8 * d * pairs + 8 * B * M * n * d * d, "exps": fwd["exps"]}


def ideal_seconds(work: dict, machine: dict) -> dict:
    t_flop = work["flops"] / machine["matmul_flops_per_s"]
    t_exp = work["exps"] / machine["exp_per_s"]
    return {"ideal_s": t_flop + t_exp, "bound": "matmul" if t_flop >= t_exp else "exp",
            "t_flop_s": t_flop, "t_exp_s": t_exp}


def fused_work(B, n, d, L, M) -> dict:
    """FLOPs and exps the fused forward + backward (`meanfield_tf.euler_flow`) executes, L layers.

    Per (head, query, key) pair: forward 4d flops + 1 exp; backward 10d flops (scores again,
    `gy·x`, `dz`, value and key cotangents) + 1 exp. Per (head, token): forward `Aᵀx`, `V y`
    (2d² each); backward `Aᵀx` again, `Vᵀg`, `dV`, `dA`, `A dz` (2d² each).
    """
    pairs, rows = B * M * n * n, B * M * n
    return {"flops": L * (14 * d * pairs + 14 * rows * d * d), "exps": L * 2 * pairs}
