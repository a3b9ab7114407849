"""The fused discrete adjoint against the old gradient path and PyTorch's fused attention.

    python -m benchmarks.bench_fused            # main (8,256,16,4,256) and large (1,4096,16,2,8)
    python -m benchmarks.bench_fused --quick    # tiny sizes: a smoke test

Side by side in one process, float32, the same data, medians of `--rounds` (≥ 5) alternating
calls (every round calls every contender once, so load drifts hit all of them alike):

- `ours fwd`: `mf.flow` with `ChunkedKernel(128)` (Euler, one step per layer);
- `ours fused fwd`: `euler_flow` (the forward of the fused path);
- `ours fused fwd+grad`: `jax.value_and_grad` of `mean(|x_1|^2)` through `euler_flow` in (A, V);
- `old fwd+grad`: the same through `mf.flow` with `ChunkedKernel(128)` (checkpointed autodiff
  through diffrax, each step's forward re-run in the backward);
- `sdpa fwd`, `sdpa fwd+grad`: `benchmarks/torch_sdpa.py`, its faster key/value layout, the
  same thread count.

Reports wall-clock and process CPU-time medians (CPU time is less sensitive to other processes
on a shared machine), XLA's `memory_analysis()` peak (temp + output bytes) for the JAX
executables — and, at the large size, that of the dense-kernel gradient (compiled, not run) —
and the fraction of the measured roofline (`roofline.py`) for the minimal work and for the work
the fused path actually executes. Writes `benchmarks/results/fused-<time>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SIZES = {"main": (8, 256, 16, 4, 256), "large": (1, 4096, 16, 2, 8)}
QUICK_SIZES = {"main": (2, 64, 8, 2, 16), "large": (1, 1024, 8, 2, 4)}
THREADS = 2
# the fused path's key chunk per size (tuned on 2 cores: one chunk of all keys at n = 256;
# 512-key chunks at n = 4096, ~20% faster forward than one 4096-key chunk); --chunk overrides
FUSED_CHUNK = {"main": None, "large": 512}


def _timed(call):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(call())
    return time.perf_counter() - t0, time.process_time() - c0


def _compile(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    mem = None if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
    return compiled, mem


def bench_size(name, shape, rounds, chunk, block_rows, use_torch):
    import meanfield_tf as mf
    from meanfield_tf._euler_adjoint import euler_flow

    from . import jax_models, torch_sdpa
    from .run import make_data

    B, n, d, L, M = shape
    A, V, x, w = make_data(*shape)
    args = tuple(jnp.asarray(a) for a in (A, V, x, w))

    def fused_forward(A, V, x, w):
        return euler_flow(mf.HeadMeasure(A=A, V=V, check=False), x, w, chunk_size=chunk,
                          block_rows=block_rows)

    def fused_grad(A, V, x, w):
        loss = lambda A, V: jnp.mean(fused_forward(A, V, x, w) ** 2)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(A, V)

    old = jax_models.Ours(mf.ChunkedKernel(128))
    jax_fns = {"ours fwd": old.forward, "ours fused fwd": fused_forward,
               "ours fused fwd+grad": fused_grad, "old fwd+grad": old.loss_and_grad}
    calls, rows = {}, {}
    for label, fn in jax_fns.items():
        t0 = time.perf_counter()
        compiled, mem = _compile(fn, *args)
        rows[label] = {"compile_s": time.perf_counter() - t0, "peak_bytes": mem}
        calls[label] = lambda c=compiled: c(*args)
    if n >= 2048:  # the dense kernel's gradient at large n: compiled for its memory, never run
        _, mem = _compile(jax_models.Ours(mf.DenseKernel()).loss_and_grad, *args)
        rows["dense fwd+grad (memory only)"] = {"peak_bytes": mem}
    if use_torch:
        kv = torch_sdpa.best_kv(A, V, x, w, THREADS)
        peer = torch_sdpa.SDPAPeer(THREADS, kv)
        peer.setup(A, V, x, w)
        calls["sdpa fwd"], calls["sdpa fwd+grad"] = peer.forward, peer.loss_and_grad
        rows["sdpa fwd"], rows["sdpa fwd+grad"] = {"kv": kv}, {"kv": kv}
    for call in calls.values():  # warm-up
        _timed(call)
    samples = {label: [] for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            samples[label].append(_timed(call))
    for label, s in samples.items():
        s = np.asarray(s)
        rows[label].update(wall_s=float(np.median(s[:, 0])), cpu_s=float(np.median(s[:, 1])),
                           wall_all=s[:, 0].tolist())
    return rows


def report(results, machine, roofline):
    lines = [f"Machine: {machine['cpus']} CPUs, JAX and PyTorch at {THREADS} threads, load "
             f"average {machine['load_start']} at start, {machine['load_end']} at end; measured "
             f"matmul {machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, exp "
             f"{machine['exp_per_s'] / 1e9:.2f} G/s.", "",
             "| size (B,n,d,L,M) | contender | wall s | CPU s | peak MiB | roofline (minimal) "
             "| roofline (executed) |", "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        shape = tuple(res["shape"])
        for label, r in res["rows"].items():
            wall = f"{r['wall_s']:.3f}" if "wall_s" in r else "—"
            cpu = f"{r['cpu_s']:.3f}" if "cpu_s" in r else "—"
            mem = "—" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.1f}"
            rf = r.get("roofline_minimal")
            re_ = r.get("roofline_executed")
            lines.append(f"| {name} {shape} | {label}{' (' + r['kv'] + ')' if 'kv' in r else ''} "
                         f"| {wall} | {cpu} | {mem} | {'—' if rf is None else f'{100 * rf:.0f}%'} "
                         f"| {'—' if re_ is None else f'{100 * re_:.0f}%'} |")
    lines += ["", "Targets:", ""]

    def verdict(text, value, ok, detail):
        if value is None:
            lines.append(f"- {text}: not measured")
        else:
            lines.append(f"- {text}: **{'met' if ok else 'missed'}** — {detail}")

    for name, res in results.items():
        r = res["rows"]
        g, f, ff = (r[k]["wall_s"] for k in ("ours fused fwd+grad", "ours fwd", "ours fused fwd"))
        gc, fc = r["ours fused fwd+grad"]["cpu_s"], r["ours fwd"]["cpu_s"]
        verdict(f"fwd+grad ÷ fwd ≤ 3.0 ({name})", g / f, g / f <= 3.0,
                f"{g / f:.2f} wall, {gc / fc:.2f} CPU time (÷ fused fwd: {g / ff:.2f}); "
                f"old path {r['old fwd+grad']['wall_s'] / f:.2f}")
        if "sdpa fwd+grad" in r:
            s = r["sdpa fwd+grad"]["wall_s"] / g
            sc = r["sdpa fwd+grad"]["cpu_s"] / gc
            verdict(f"fwd+grad ≥ 1.5× faster than SDPA ({name})", s, s >= 1.5,
                    f"{s:.2f}× wall ({g:.3f} s vs {r['sdpa fwd+grad']['wall_s']:.3f} s), "
                    f"{sc:.2f}× CPU time")
            best_f = min(f, ff)
            s = r["sdpa fwd"]["wall_s"] / best_f
            verdict(f"forward ≥ 1.2× faster than SDPA ({name})", s, s >= 1.2,
                    f"{s:.2f}× wall (ours {best_f:.3f} s — flow {f:.3f}, fused {ff:.3f} — vs "
                    f"{r['sdpa fwd']['wall_s']:.3f} s), "
                    f"{r['sdpa fwd']['cpu_s'] / min(fc, r['ours fused fwd']['cpu_s']):.2f}× CPU")
        else:
            verdict(f"SDPA comparison ({name})", None, False, "")
    main = results.get("main")
    if main:
        rf = main["rows"]["ours fused fwd+grad"]["roofline_minimal"]
        re_ = main["rows"]["ours fused fwd+grad"]["roofline_executed"]
        verdict("fused fwd+grad ≥ 50% of the roofline (main)", rf, rf >= 0.5,
                f"{100 * rf:.0f}% of the minimal work's ideal time ({100 * re_:.0f}% of the "
                f"executed work's: {roofline['main']['executed_exps'] / roofline['main']['minimal_exps']:.0f}× "
                f"the exps, {roofline['main']['executed_flops'] / roofline['main']['minimal_flops']:.2f}× "
                f"the flops)")
    large = results.get("large")
    if large:
        mf_ = large["rows"]["ours fused fwd+grad"]["peak_bytes"]
        md = large["rows"].get("dense fwd+grad (memory only)", {}).get("peak_bytes")
        ok = mf_ is not None and md is not None
        verdict("gradient peak memory at large n ≤ 2% of dense", mf_ / md if ok else None,
                ok and mf_ / md <= 0.02,
                f"{100 * mf_ / md:.2f}% ({mf_ / 2**20:.1f} MiB vs {md / 2**20:.1f} MiB)" if ok else "")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from . import roofline, torch_sdpa

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_fused",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating calls per contender (≥ 5)")
    ap.add_argument("--sizes", default="main,large")
    ap.add_argument("--chunk", type=int, default=None,
                    help="fused path: keys per chunk (default per size, FUSED_CHUNK)")
    ap.add_argument("--block-rows", type=int, default=None, help="fused path: rows per block")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.rounds < 5 and not args.quick:
        raise SystemExit("--rounds must be >= 5 (medians of at least 5 calls)")

    jax.config.update("jax_enable_x64", False)
    table = QUICK_SIZES if args.quick else SIZES
    use_torch = torch_sdpa.AVAILABLE and not args.no_torch
    t_start = time.time()
    machine = roofline.measure(quick=args.quick)
    machine.update(cpus=os.cpu_count(), load_start=tuple(round(v, 1) for v in os.getloadavg()),
                   jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
    if use_torch:
        import torch

        machine["torch"] = torch.__version__
    results, works = {}, {}
    for name in args.sizes.split(","):
        shape = table[name]
        B, n, d, L, M = shape
        chunk = args.chunk if args.chunk is not None else FUSED_CHUNK.get(name)
        rows = bench_size(name, shape, args.rounds, chunk, args.block_rows, use_torch)
        fwd = {k: L * v for k, v in roofline.velocity_work(B, n, d, M).items()}
        minimal = {k: L * v for k, v in roofline.gradient_work(B, n, d, M).items()}
        executed = roofline.fused_work(*shape)
        works[name] = {"minimal_flops": minimal["flops"], "minimal_exps": minimal["exps"],
                       "executed_flops": executed["flops"], "executed_exps": executed["exps"]}
        for label, r in rows.items():
            if "wall_s" not in r:
                continue
            if "grad" in label:
                r["roofline_minimal"] = roofline.ideal_seconds(minimal, machine)["ideal_s"] / r["wall_s"]
                if "fused" in label:
                    r["roofline_executed"] = (roofline.ideal_seconds(executed, machine)["ideal_s"]
                                              / r["wall_s"])
            else:
                r["roofline_minimal"] = roofline.ideal_seconds(fwd, machine)["ideal_s"] / r["wall_s"]
        results[name] = {"shape": list(shape), "rows": rows}
        print(f"{name} {shape}: " + ", ".join(
            f"{k} {r['wall_s']:.3f} s" for k, r in rows.items() if "wall_s" in r), flush=True)
    machine["load_end"] = tuple(round(v, 1) for v in os.getloadavg())
    machine["total_s"] = time.time() - t_start
    md = report(results, machine, works)
    print()
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"fused-{stamp}.json").write_text(json.dumps(
        {"machine": machine, "results": results, "work": works,
         "options": {"chunk": {k: (args.chunk or FUSED_CHUNK.get(k)) for k in results}, "block_rows": args.block_rows, "rounds": args.rounds}},
        indent=1))
    (out / f"fused-{stamp}.md").write_text(md)
    print(f"wrote {out / f'fused-{stamp}.json'} and .md ({machine['total_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
