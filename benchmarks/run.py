"""One entry point for the benchmark suite: `python -m benchmarks.run [--quick] [--sizes ...]`.

For every size and contender it measures, side by side in one process:

- `velocity` (one vector-field evaluation of the batch), `forward` (the L-layer Euler flow) and
  `grad` (forward + gradient of `mean(|x_1|^2)` w.r.t. A and V);
- compile time (JAX: `lower` + `compile`, reported apart) and the median wall time (and process
  CPU time) of the compiled function after one warm-up call, taken in alternating rounds: every
  round calls every contender of the size once, so a load drift on a shared machine hits them
  alike (repeats chosen from the warm-up to fit a time budget, at least 3 for `ours-chunked`,
  `ours-fused` and `torch-sdpa`, whose ratios are the targets; count saved);
- peak memory: JAX — XLA's `compiled.memory_analysis()` temp + output bytes (what the
  executable allocates, exact and noise-free); PyTorch — the peak process RSS increase during
  the warm-up call, sampled every 2 ms (an estimate);
- the fraction of this machine's roofline: ideal time of the evaluation's FLOPs and exps
  (`benchmarks/roofline.py`, measured at the start and at the end, the faster of the two
  kept) divided by the median time — the minimal
  work of the algorithm for every contender (a backward from stored probabilities), and for
  `ours-fused` also the work it executes (scores recomputed in the backward).

Contenders: `ours-dense`, `ours-chunked` (`mf.flow`, gradient by autodiff through diffrax),
`ours-fused` (`mf.euler_flow`, the fused discrete adjoint that `risk_and_gradient` and training
use), `naive-jax`, `jax-dpa` (`jax.nn.dot_product_attention`), and with PyTorch installed
`torch-sdpa` (`scaled_dot_product_attention` per layer, its faster key/value layout, the
strongest peer), `torch-odeint` and `torch-odeint_adjoint` (torchdiffeq).

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

import meanfield_tf as mf
from meanfield_tf._native_attention import scratch_bytes

from . import jax_models, roofline, torch_models, torch_sdpa

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
# the contenders the targets compare: always timed after the warm-up, at least this many times
KEY_CONTENDERS = ("ours-chunked", "ours-fused", "torch-sdpa")
MIN_KEY_REPEATS = 3
THREADS = 2  # PyTorch's intra-op threads: the same as XLA's CPU client on this 2-core machine
# who runs where: the dense-score peers are skipped at large n except for the dense kernel itself
LARGE_CONTENDERS = ("ours-dense", "ours-chunked", "ours-fused", "ours-fused-xla", "naive-jax",
                    "torch-sdpa")


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


def _timed(call):
    """Wall and process CPU seconds of one call (CPU time is steadier on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(call())
    return time.perf_counter() - t0, time.process_time() - c0


def prepare_jax(model, task, A, V, x, w):
    """Compile the contender's task; returns (row fields, call, warm-up seconds)."""
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
    call = lambda: compiled(*args)  # noqa: E731
    warm = _timed(call)[0]
    return ({"compile_s": compile_s, "peak_bytes": mem, "memory_source": "xla temp+output"},
            call, warm)


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


def prepare_torch(peer, task):
    """The peer's task (already `setup` with the data); warm-up under an RSS sampler."""
    call = {"velocity": peer.velocity, "forward": peer.forward, "grad": peer.loss_and_grad}[task]
    with _RssPeak() as rss:
        warm = _timed(call)[0]
    return ({"compile_s": None, "peak_bytes": rss.delta, "memory_source": "RSS delta (sampled)"},
            call, warm)


def time_alternating(entries, budget_s, max_repeats):
    """Time every entry `(row, call, warm)` in alternating rounds — each round calls every entry
    that still needs samples — so that load drifts on a shared machine hit all contenders alike.
    An entry gets `_repeats(warm)` samples (0: its warm-up is the one sample, `reps 1*`)."""
    wanted = [max(_repeats(warm, budget_s, max_repeats),
                  MIN_KEY_REPEATS if row["contender"] in KEY_CONTENDERS else 0)
              for row, _, warm in entries]
    samples = [[] for _ in entries]
    for round_ in range(max(wanted, default=0)):
        for i, (_, call, _) in enumerate(entries):
            if round_ < wanted[i]:
                samples[i].append(_timed(call))
    for (row, _, warm), k, got in zip(entries, wanted, samples):
        wall = [t for t, _ in got] or [warm]
        row.update(median_s=float(np.median(wall)), repeats=k,
                   cpu_median_s=float(np.median([c for _, c in got])) if got else None)


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
           f"{machine['exp_per_s'] / 1e9:.2f} G/s at start, "
           f"{machine['matmul_flops_per_s_end'] / 1e9:.1f} GFLOP/s, "
           f"{machine['exp_per_s_end'] / 1e9:.2f} G/s at end (the roofline column uses the "
           f"faster of each; exp is the faster of XLA's, "
           f"{machine.get('exp_per_s_xla', machine['exp_per_s']) / 1e9:.2f} G/s, and the native "
           f"kernel's at start); load average at start/end "
           f"{machine['load_start']} / {machine['load_end']}. Native CPU attention kernel: "
           f"{'in use' if machine.get('native_kernel', {}).get('available') else 'not in use'}"
           f" (`ours-fused`; `ours-fused-xla` is the same path on XLA's blocks).\n\n")
    return top + head + "\n".join(lines) + "\n"


def _find(rows, size, contender, task, key="median_s"):
    for r in rows:
        if r["size"] == size and r["contender"] == contender and r["task"] == task and key in r:
            return r[key]
    return None


def summary(rows) -> str:
    """Per size and contender: forward and forward+gradient medians, grad/fwd, the gradient's
    peak memory, how many times faster `ours-fused` is, and the roofline fractions."""
    head = ("| size (B,n,d,L,M) | contender | fwd s | fwd+grad s | grad/fwd | grad peak MiB "
            "| CPU s fwd / fwd+grad | grad/fwd (CPU) | ours-fused faster: fwd / fwd+grad (CPU) "
            "| roofline fwd / fwd+grad |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for size in dict.fromkeys(r["size"] for r in rows):
        shape = next(tuple(r["shape"]) for r in rows if r["size"] == size)
        ff, fg = _find(rows, size, "ours-fused", "forward"), _find(rows, size, "ours-fused", "grad")
        fgc = _find(rows, size, "ours-fused", "grad", "cpu_median_s")
        for name in dict.fromkeys(r["contender"] for r in rows if r["size"] == size):
            f, g = _find(rows, size, name, "forward"), _find(rows, size, name, "grad")
            if name == "torch-odeint_adjoint":
                f = _find(rows, size, "torch-odeint", "forward")
            if f is None and g is None:
                continue
            mem = _find(rows, size, name, "grad", "peak_bytes")
            rf = _find(rows, size, name, "forward", "roofline_fraction")
            rg = _find(rows, size, name, "grad", "roofline_fraction")
            kv = _find(rows, size, name, "grad", "kv")
            gc = _find(rows, size, name, "grad", "cpu_median_s")
            fc = _find(rows, size, name, "forward", "cpu_median_s")

            def num(v, fmt):
                return "—" if v is None else format(v, fmt)

            faster = "—" if name == "ours-fused" else (
                f"{num(f / ff if f and ff else None, '.2f')}× / "
                f"{num(g / fg if g and fg else None, '.2f')}× "
                f"({num(gc / fgc if gc and fgc else None, '.2f')}×)")
            lines.append(
                f"| {size} {shape} | {name}{f' ({kv})' if kv else ''} | {num(f, '.4f')} "
                f"| {num(g, '.4f')} | {num(g / f if f and g else None, '.2f')} "
                f"| {fmt_bytes(mem) if g is not None else '—'} | {num(fc, '.3f')} / {num(gc, '.3f')} "
                f"| {num(gc / fc if gc and fc else None, '.2f')} | {faster} "
                f"| {num(100 * rf if rf else None, '.0f')}% / {num(100 * rg if rg else None, '.0f')}% |")
    return head + "\n".join(lines) + "\n"


def targets(rows, large="large"):
    out = []
    main = "main" if any(r["size"] == "main" and "median_s" in r for r in rows) else "main-L4"
    out.append(f"(`ours-fused` is the gradient path of `risk_and_gradient` and training; main "
               f"size `{main}`, large size `{large}`)")

    def verdict(name, value, ok, detail):
        if value is None:
            out.append(f"- {name}: not measured ({detail})")
        else:
            out.append(f"- {name}: **{'met' if ok else 'missed'}** — {detail}")

    def ratio(a, b):
        return None if a is None or b is None else a / b

    for size in (main, large):
        g, f = _find(rows, size, "ours-fused", "grad"), _find(rows, size, "ours-fused", "forward")
        r = ratio(g, f)
        rc = ratio(_find(rows, size, "ours-fused", "grad", "cpu_median_s"),
                   _find(rows, size, "ours-fused", "forward", "cpu_median_s"))
        verdict(f"forward+gradient ÷ forward ≤ 3 ({size}; wall and CPU time)", r,
                r is not None and r <= 3 and (rc is None or rc <= 3),
                f"{r:.2f} wall ({g:.3f} s / {f:.3f} s), {'—' if rc is None else f'{rc:.2f}'} CPU time"
                if r else "missing rows")
        for task, label, need in (("grad", "forward+gradient", 1.5), ("forward", "forward", 1.2)):
            ours = [c for c in ("ours-fused", "ours-chunked") if task == "forward" or c == "ours-fused"]
            ours = [(c, _find(rows, size, c, task)) for c in ours]
            ours = min((o for o in ours if o[1] is not None), key=lambda o: o[1], default=(None, None))
            t = _find(rows, size, "torch-sdpa", task)
            s = ratio(t, ours[1])
            sc = ratio(_find(rows, size, "torch-sdpa", task, "cpu_median_s"),
                       _find(rows, size, ours[0], task, "cpu_median_s"))
            verdict(f"{label} ≥ {need}× faster than PyTorch SDPA ({size}; wall and CPU time)", s,
                    s is not None and s >= need and (sc is None or sc >= need),
                    f"{s:.2f}× wall ({ours[0]} {ours[1]:.3f} s vs {t:.3f} s), "
                    f"{'—' if sc is None else f'{sc:.2f}×'} CPU time" if s
                    else "torch not installed or skipped")
    fr = _find(rows, main, "ours-fused", "grad", "roofline_fraction")
    fe = _find(rows, main, "ours-fused", "grad", "roofline_executed")
    verdict(f"forward+gradient ≥ 50% of the measured roofline ({main})", fr,
            fr is not None and fr >= 0.5,
            f"{100 * fr:.0f}% of the minimal work's ideal time, {100 * fe:.0f}% of the work it "
            f"executes (scores recomputed in the backward: 2× the exps, 1.17× the flops)"
            if fr else "missing rows")
    mc = _find(rows, large, "ours-fused", "grad", "peak_bytes")
    md = _find(rows, large, "ours-dense", "grad", "peak_bytes")
    s = ratio(mc, md)
    verdict(f"gradient peak memory ≤ 2% of the dense kernel's ({large})", s,
            s is not None and s <= 0.02,
            f"{100 * s:.2f}% ({fmt_bytes(mc)} MiB vs {fmt_bytes(md)} MiB)" if s else "missing rows")
    for peer in ("naive-jax", "jax-dpa", "torch-odeint", "torch-odeint_adjoint"):
        t = _find(rows, main, peer, "grad")
        s = ratio(t, _find(rows, main, "ours-fused", "grad"))
        if s:
            out.append(f"- (forward+gradient against {peer} at {main}: {s:.2f}× faster)")
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
    if machine.get("exp_per_s_native") is None:
        machine.pop("exp_per_s_native", None)
    machine.update(cpus=os.cpu_count(), load_start=tuple(round(v, 1) for v in os.getloadavg()),
                   platform=platform.platform(), jax=jax.__version__,
                   device=str(jax.devices()[0]))
    status = mf.native_kernel_status()  # builds the kernel now, not inside a timed call
    machine["native_kernel"] = {"available": status.available, "mode": status.mode,
                                "reason": status.reason}
    print(f"native CPU attention kernel: {'in use' if status.available else status.reason}",
          flush=True)
    print(f"roofline: matmul {machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
          f"exp {machine['exp_per_s'] / 1e9:.2f} G/s", flush=True)

    contenders = dict(jax_models.contenders())
    torch_note = None
    if torch_sdpa.AVAILABLE and not args.no_torch:
        import torch

        machine["torch"] = torch.__version__
        contenders["torch-sdpa"] = torch_sdpa.BestSDPAPeer(threads=THREADS)
        if torch_models.AVAILABLE:
            contenders["torch-odeint"] = torch_models.TorchPeer(adjoint=False)
            contenders["torch-odeint_adjoint"] = torch_models.TorchPeer(adjoint=True)
    else:
        torch_note = ("torch not installed (pip install -e '.[bench]')" if not torch_sdpa.AVAILABLE
                      else "--no-torch")

    rows = []
    for size, shape in sizes:
        B, n, d, L, M = shape
        data = make_data(*shape)
        entries = []
        for name, model in contenders.items():
            is_large = size == "large" or n >= 2048
            if name.startswith("torch"):
                model.setup(*data)
            for task in TASKS:
                row = {"size": size, "shape": list(shape), "contender": name, "task": task}
                rows.append(row)
                if is_large and name not in LARGE_CONTENDERS:
                    row["skipped"] = "dense-score peer at large n (time budget)"
                elif is_large and name == "naive-jax" and task == "grad":
                    row["skipped"] = "same dense scores as ours-dense (time budget)"
                elif name == "torch-odeint_adjoint" and task != "grad":
                    row["skipped"] = "same forward as torch-odeint"
                if "skipped" in row:
                    continue
                if name.startswith("torch"):
                    info, call, warm = prepare_torch(model, task)
                    if hasattr(model, "kv"):
                        row["kv"] = model.kv
                else:
                    info, call, warm = prepare_jax(model, task, *data)
                    if name == "ours-fused" and mf.native_kernel_status().available:
                        # the native kernel's own scratch is outside XLA's memory analysis
                        kind = {"velocity": "rows_forward", "forward": "step_forward",
                                "grad": "step_backward"}[task]
                        info["peak_bytes"] += scratch_bytes(kind, B, n, d, M, 4, os.cpu_count())
                        info["memory_source"] = "xla temp+output + native scratch"
                row.update(info)
                entries.append((row, call, warm))
                print(f"{size:6s} {name:22s} {task:8s} ready (warm-up {warm:.3f} s)", flush=True)
        time_alternating(entries, budget, max_repeats)
        for row, _, _ in entries:
            print(f"{size:6s} {row['contender']:22s} {row['task']:8s} {row['median_s']:.4f} s  "
                  f"{fmt_bytes(row['peak_bytes'])} MiB", flush=True)
        if torch_note:
            rows.append({"size": size, "shape": list(shape), "contender": "torch-*", "task": "all",
                         "skipped": torch_note})
    machine["load_end"] = tuple(round(v, 1) for v in os.getloadavg())
    end = roofline.measure(quick=args.quick)  # the machine is shared: how much did it drift?
    machine["matmul_flops_per_s_end"] = end["matmul_flops_per_s"]
    machine["exp_per_s_end"] = end["exp_per_s"]
    # the roofline is the best this machine showed (start or end): on a shared machine the lower
    # measurement only says how loaded it was, and would flatter every fraction
    rates = {k: max(machine[k], end[k]) for k in ("matmul_flops_per_s", "exp_per_s")}
    for row in rows:
        if "median_s" not in row:
            continue
        row.update(roofline.ideal_seconds(work_of(row["task"], *row["shape"]), rates))
        row["roofline_fraction"] = row["ideal_s"] / row["median_s"]
        if row["contender"] == "ours-fused" and row["task"] == "grad":  # the work it executes
            executed = roofline.ideal_seconds(roofline.fused_work(*row["shape"]), rates)
            row["roofline_executed"] = executed["ideal_s"] / row["median_s"]
    machine["total_s"] = time.time() - t_start

    md = (markdown(rows, machine) + "\nSummary (forward and forward+gradient side by side):\n\n"
          + summary(rows) + "\nTargets:\n\n" + targets(rows))
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
