"""One entry point for the benchmark suite: `python -m benchmarks.run [--quick] [--sizes ...]`.

For every size and contender it measures, side by side in one process:

- `velocity` (one vector-field evaluation of the batch), `forward` (the L-layer Euler flow) and
  `grad` (forward + gradient of `mean(|x_1|^2)` w.r.t. A and V);
- compile time (JAX: `lower` + `compile`, reported apart) and the median wall time of the
  compiled function after one warm-up call (repeats chosen to fit a time budget; count saved);
- peak memory: JAX — XLA's `compiled.memory_analysis()` temp + output bytes (what the
  executable allocates, exact and noise-free); PyTorch — the peak process RSS increase during
  the warm-up call, sampled every 2 ms (an estimate);
- the fraction of this machine's roofline: ideal time of the evaluation's FLOPs and exps
  (`benchmarks/roofline.py`, measured at start-up) divided by the median time.

Writes `benchmarks/results/bench-<time>.json` and `.md` and prints the Markdown table, followed
by the performance targets (met/missed with the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import jax_models, roofline, torch_models

# name: (B, n, d, L, M)
SIZES = {
    "small": (8, 64, 16, 16, 64),
    "main": (8, 256, 16, 16, 256),
    # the same with L = 4: every cost is linear in L (same per-layer work), so the ratios are
    # those of `main`; the default run uses it to finish in < 10 min on 2 shared cores
    "main-L4": (8, 256, 16, 4, 256),
    "large": (1, 4096, 16, 2, 8),  # large n: B, L, M reduced to fit the time budget
}
DEFAULT_SIZES = ("small", "main-L4", "large")
QUICK_SIZES = {
    "small": (2, 32, 8, 4, 8),
    "main": (2, 64, 8, 4, 16),
    "large": (1, 1024, 8, 2, 4),
}
QUICK_DEFAULT = ("small", "main", "large")
TASKS = ("velocity", "forward", "grad")
# who runs where: the dense-score peers are skipped at large n except for the dense kernel itself
LARGE_CONTENDERS = ("ours-dense", "ours-chunked", "naive-jax")


def parse_size(text: str, table: dict) -> tuple[str, tuple]:
    if text in table:
        return text, table[text]
    try:
        B, n, d, L, M = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(
            f"unknown size {text!r}: use one of {sorted(table)} or BxNxDxLxM, e.g. 8x256x16x16x256"
        ) from None
    return text, (B, n, d, L, M)


def make_data(B, n, d, L, M, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, n, d)).astype(np.float32)
    w = np.full((B, n), 1.0 / n, np.float32)
    A = (rng.standard_normal((L, M, d, d)) / np.sqrt(d)).astype(np.float32)
    V = (rng.standard_normal((L, M, d, d)) / np.sqrt(d)).astype(np.float32)
    return A, V, x, w


def _repeats(first_s, budget_s, max_repeats):
    """Timed repeats after the warm-up call; 0 when the warm-up alone took over 2 budgets (the
    warm-up time is then the one sample — an already compiled call, marked `reps 1*`)."""
    if first_s > 2 * budget_s:
        return 0
    return int(max(1, min(max_repeats, budget_s // max(first_s, 1e-9))))


def _timed_runs(call, budget_s, max_repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(call())  # warm-up
    warm = time.perf_counter() - t0
    repeats = _repeats(warm, budget_s, max_repeats)
    times = [] if repeats else [warm]
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), repeats, warm


def bench_jax(model, task, A, V, x, w, budget_s, max_repeats):
    A, V, x, w = (jnp.asarray(a) for a in (A, V, x, w))
    if task == "velocity":
        fn, args = model.velocity, (x, w, A, V)
    elif task == "forward":
        fn, args = model.forward, (A, V, x, w)
    else:
        fn, args = model.loss_and_grad, (A, V, x, w)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    mem = None if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
    median, repeats, _ = _timed_runs(lambda: compiled(*args), budget_s, max_repeats)
    return {"compile_s": compile_s, "median_s": median, "repeats": repeats, "peak_bytes": mem,
            "memory_source": "xla temp+output"}


class _RssPeak:
    """Peak resident set size increase of this process while the block runs (sampled)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.stop = False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.delta = max(0, self.peak - self.base)


def bench_torch(peer, task, A, V, x, w, budget_s, max_repeats):
    import torch

    peer.setup(A, V, x, w)
    call = {"velocity": peer.velocity, "forward": peer.forward, "grad": peer.loss_and_grad}[task]
    with _RssPeak() as rss:
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
    repeats = _repeats(first, budget_s, max_repeats)
    times = [] if repeats else [first]
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    del torch
    return {"compile_s": None, "median_s": float(np.median(times)), "repeats": repeats,
            "peak_bytes": rss.delta, "memory_source": "RSS delta (sampled)"}


def work_of(task, B, n, d, L, M):
    if task == "velocity":
        return roofline.velocity_work(B, n, d, M)
    one = roofline.velocity_work(B, n, d, M) if task == "forward" else roofline.gradient_work(B, n, d, M)
    return {k: L * v for k, v in one.items()}


def fmt_bytes(b):
    return "—" if b is None else f"{b / 2**20:.1f}"


def markdown(rows, machine):
    head = ("| size (B,n,d,L,M) | contender | task | compile s | median s | reps | peak MiB "
            "| memory from | ideal s (bound) | roofline |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['size']} {tuple(r['shape'])} | {r['contender']} | {r['task']} "
                         f"| — | — | — | — | — | — | skipped: {r['skipped']} |")
            continue
        comp = "—" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        lines.append(
            f"| {r['size']} {tuple(r['shape'])} | {r['contender']} | {r['task']} | {comp} "
            f"| {r['median_s']:.4f} | {r['repeats'] or '1*'} | {fmt_bytes(r['peak_bytes'])} "
            f"| {r['memory_source']} | {r['ideal_s']:.4f} ({r['bound']}) "
            f"| {100 * r['roofline_fraction']:.0f}% |")
    top = (f"Machine: {machine['cpus']} CPUs, measured matmul "
           f"{machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, exp "
           f"{machine['exp_per_s'] / 1e9:.2f} G/s at start (roofline column), "
           f"{machine['matmul_flops_per_s_end'] / 1e9:.1f} GFLOP/s, "
           f"{machine['exp_per_s_end'] / 1e9:.2f} G/s at end; load average at start/end "
           f"{machine['load_start']} / {machine['load_end']}.\n\n")
    return top + head + "\n".join(lines) + "\n"


def _find(rows, size, contender, task, key="median_s"):
    for r in rows:
        if r["size"] == size and r["contender"] == contender and r["task"] == task and key in r:
            return r[key]
    return None


def targets(rows, large="large"):
    out = []
    main = "main" if any(r["size"] == "main" and "median_s" in r for r in rows) else "main-L4"
    out.append(f"(measured at size `{main}`)")

    def verdict(name, value, ok, detail):
        if value is None:
            out.append(f"- {name}: not measured ({detail})")
        else:
            out.append(f"- {name}: **{'met' if ok else 'missed'}** — {detail}")

    g, f = _find(rows, main, "ours-chunked", "grad"), _find(rows, main, "ours-chunked", "forward")
    r = None if g is None or f is None else g / f
    verdict("forward+gradient ÷ forward ≤ 3 (ours-chunked, main)", r, r is not None and r <= 3,
            f"ratio {r:.2f}" if r else "missing rows")
    gd, fd = _find(rows, main, "ours-dense", "grad"), _find(rows, main, "ours-dense", "forward")
    if gd and fd:
        out.append(f"  (ours-dense, plain autodiff: ratio {gd / fd:.2f})")
    for peer in ("torch-odeint", "torch-odeint_adjoint"):
        t = _find(rows, main, peer, "grad")
        s = None if t is None or g is None else t / g
        verdict(f"≥ 3× faster than {peer} (forward+gradient, main)", s, s is not None and s >= 3,
                f"{s:.2f}× ({t:.3f} s vs {g:.3f} s)" if s else "torch not installed or skipped")
    t = _find(rows, main, "naive-jax", "grad")
    s = None if t is None or g is None else t / g
    verdict("≥ 2× faster than naive JAX (forward+gradient, main)", s, s is not None and s >= 2,
            f"{s:.2f}× ({t:.3f} s vs {g:.3f} s)" if s else "missing rows")
    mc = _find(rows, large, "ours-chunked", "grad", "peak_bytes")
    md = _find(rows, large, "ours-dense", "grad", "peak_bytes")
    s = None if mc is None or md is None else mc / md
    verdict("gradient at large n ≤ 10% of the dense gradient's peak memory", s, s is not None and s <= 0.1,
            f"{100 * s:.2f}% ({fmt_bytes(mc)} MiB vs {fmt_bytes(md)} MiB)" if s else "missing rows")
    vc = _find(rows, large, "ours-chunked", "velocity", "peak_bytes")
    vd = _find(rows, large, "ours-dense", "velocity", "peak_bytes")
    if vc and vd:
        out.append(f"- chunked vs dense velocity peak memory at large n: {fmt_bytes(vc)} MiB vs "
                   f"{fmt_bytes(vd)} MiB ({100 * vc / vd:.1f}%)")
    fr = _find(rows, large, "ours-chunked", "velocity", "roofline_fraction")
    bound = _find(rows, large, "ours-chunked", "velocity", "bound")
    verdict("forward kernel at large n ≥ 70% of the measured roofline", fr, fr is not None and fr >= 0.7,
            f"{100 * fr:.0f}% of the ideal ({bound}-bound)" if fr else "missing rows")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, short budgets (a smoke test)")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated names (small, main, main-L4, large) or BxNxDxLxM; "
                         "default small,main-L4,large")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed repeats per measurement (default 3, quick 0.5); a "
                         "call whose warm-up exceeds 2 budgets is timed once (reps 1*)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    jax.config.update("jax_enable_x64", False)
    table = QUICK_SIZES if args.quick else SIZES
    names = args.sizes.split(",") if args.sizes else list(QUICK_DEFAULT if args.quick else DEFAULT_SIZES)
    sizes = [parse_size(s.strip(), table) for s in names]
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 3.0)
    max_repeats = 5

    t_start = time.time()
    machine = roofline.measure(quick=args.quick)
    machine.update(cpus=os.cpu_count(), load_start=tuple(round(v, 1) for v in os.getloadavg()),
                   platform=platform.platform(), jax=jax.__version__,
                   device=str(jax.devices()[0]))
    print(f"roofline: matmul {machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
          f"exp {machine['exp_per_s'] / 1e9:.2f} G/s", flush=True)

    contenders = dict(jax_models.contenders())
    use_torch = torch_models.AVAILABLE and not args.no_torch
    torch_note = None
    if use_torch:
        import torch

        machine["torch"] = torch.__version__
        contenders["torch-odeint"] = torch_models.TorchPeer(adjoint=False)
        contenders["torch-odeint_adjoint"] = torch_models.TorchPeer(adjoint=True)
    else:
        torch_note = ("torch not installed (pip install -e '.[bench]')" if not torch_models.AVAILABLE
                      else "--no-torch")

    rows = []
    for size, shape in sizes:
        B, n, d, L, M = shape
        data = make_data(*shape)
        for name, model in contenders.items():
            is_large = size == "large" or n >= 2048
            for task in TASKS:
                row = {"size": size, "shape": list(shape), "contender": name, "task": task}
                if is_large and name not in LARGE_CONTENDERS:
                    row["skipped"] = "dense-score peer at large n (time budget)"
                elif is_large and name == "naive-jax" and task == "grad":
                    row["skipped"] = "same dense scores as ours-dense (time budget)"
                if "skipped" in row:
                    rows.append(row)
                    continue
                if name.startswith("torch"):
                    if name == "torch-odeint_adjoint" and task != "grad":
                        row["skipped"] = "same forward as torch-odeint"
                        rows.append(row)
                        continue
                    row.update(bench_torch(model, task, *data, budget, max_repeats))
                else:
                    row.update(bench_jax(model, task, *data, budget, max_repeats))
                row.update(roofline.ideal_seconds(work_of(task, *shape), machine))
                row["roofline_fraction"] = row["ideal_s"] / row["median_s"]
                rows.append(row)
                print(f"{size:6s} {name:22s} {task:8s} {row['median_s']:.4f} s  "
                      f"{fmt_bytes(row['peak_bytes'])} MiB", flush=True)
        if torch_note:
            rows.append({"size": size, "shape": list(shape), "contender": "torch-*", "task": "all",
                         "skipped": torch_note})
    machine["load_end"] = tuple(round(v, 1) for v in os.getloadavg())
    end = roofline.measure(quick=args.quick)  # the machine is shared: how much did it drift?
    machine["matmul_flops_per_s_end"] = end["matmul_flops_per_s"]
    machine["exp_per_s_end"] = end["exp_per_s"]
    machine["total_s"] = time.time() - t_start

    md = markdown(rows, machine) + "\nTargets:\n\n" + targets(rows)
    print()
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (out / f"bench-{stamp}.md").write_text(md)
    print(f"wrote {out / f'bench-{stamp}.json'} and .md ({machine['total_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
