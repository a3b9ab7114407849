"""Time and peak memory of the three gradient methods vs the number of depth steps.

All methods run side by side in one process, on one problem, for a growing number of steps per
layer `k` (total steps `L k`). Two families of rows:

- `heun`: every method differentiates the same continuous-depth model with fixed-step Heun
  (autodiff: discretise-then-optimise; backsolve and explicit: the continuous adjoint);
- `euler`: the finite transformer refined by `k` Euler steps per layer (autodiff and explicit,
  which coincide there; backsolve is refused for constant-step Euler).

Memory is XLA's compiled estimate for the whole jitted gradient (`memory_analysis()`: temporaries
plus arguments plus outputs), time the best of a few repeats after compilation. Writes JSON
(`--out`) and prints a Markdown table with ratios to autodiff at the same step count.

    python benchmarks/bench_gradients.py --out bench_gradients.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import diffrax
import jax
import jax.numpy as jnp

import meanfield_tf as mf


def _measure(fn, params, repeats: int):
    compiled = jax.jit(fn).lower(params).compile()
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    jax.block_until_ready(compiled(params))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params))
        best = min(best, time.perf_counter() - t0)
    return best, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps-per-layer", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_gradients.json")
    args = p.parse_args(argv)

    kx, kh, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    B, n, d, L, M = args.batch, args.tokens, args.dim, args.layers, args.heads
    tokens = mf.TokenBatch(jax.random.normal(kx, (B, n, d), jnp.float32))
    heads = mf.gaussian_heads(kh, L, M, d, dtype=jnp.float32)
    risk = mf.TokenRegression(jax.random.normal(ky, (B, n, d), jnp.float32))
    configs = [
        ("heun", diffrax.Heun(), ("autodiff", "backsolve", "explicit")),
        ("euler", diffrax.Euler(), ("autodiff", "explicit")),
    ]
    methods = {"autodiff": mf.Autodiff(), "backsolve": mf.Backsolve(), "explicit": mf.Explicit()}
    rows = []
    for solver_name, solver, names in configs:
        for k in args.steps_per_layer:
            stepping = mf.FixedSteps(k)
            for name in names:
                method = methods[name]

                def fn(params, method=method, stepping=stepping, solver=solver):
                    h = mf.HeadMeasure(**params, check=False)
                    return mf.risk_and_gradient(h, tokens, risk, method=method,
                                                solver=mf.DepthSolver(solver, stepping))

                seconds, peak = _measure(fn, heads.params, args.repeats)
                rows.append({"solver": solver_name, "method": name, "steps": L * k,
                             "seconds": seconds, "peak_bytes": peak})
                print(f"  {solver_name:5s} {name:9s} steps={L * k:4d}: {seconds * 1e3:8.2f} ms, "
                      f"{(peak or 0) / 2**20:8.2f} MiB", flush=True)

    base = {(r["solver"], r["steps"]): r for r in rows if r["method"] == "autodiff"}
    print()
    print(f"B={B}, n={n}, d={d}, L={L}, M={M}, float32, {jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()})")
    print()
    print("| solver | steps | method | time (ms) | peak (MiB) | time / autodiff "
          "| memory / autodiff |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        b = base[(r["solver"], r["steps"])]
        tr = r["seconds"] / b["seconds"]
        both = r["peak_bytes"] and b["peak_bytes"]
        mr = r["peak_bytes"] / b["peak_bytes"] if both else float("nan")
        r["time_ratio"], r["memory_ratio"] = tr, mr
        print(f"| {r['solver']} | {r['steps']} | {r['method']} | {r['seconds'] * 1e3:.2f} | "
              f"{(r['peak_bytes'] or 0) / 2**20:.2f} | {tr:.2f} | {mr:.2f} |")
    meta = {"batch": B, "tokens": n, "dim": d, "layers": L, "heads": M, "dtype": "float32",
            "jax": jax.__version__, "device": str(jax.devices()[0]), "repeats": args.repeats}
    with open(args.out, "w") as fh:
        json.dump({"config": meta, "rows": rows}, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
