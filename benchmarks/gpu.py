"""GPU benchmark of the attention kernels: `python -m benchmarks.gpu` (one H100/H200: < 5 min).

For each size (B, n, d, L, M), kernel (dense, chunked, cudnn, pallas) and precision policy
(float32, tf32, bf16 where the kernel takes it) it times, on the default JAX device:

- `velocity`: one head-averaged velocity of the B sequences (one layer's M heads);
- `forward`: the L-layer Euler flow X += (1/L) v(X; A_l, V_l) (a `lax.scan` over layers);
- `grad`: forward + gradient of the risk mean(|X_1|^2) w.r.t. (A, V) (`jax.grad` through the
  scan, each layer rematerialised with `jax.checkpoint`, so the backward pass holds one layer);

and the PyTorch peer (`torch.nn.functional.scaled_dot_product_attention` with M query heads
`A^T x` sharing one key/value head `x`, `attn_mask = log w`, `scale = 1`, same sizes and
precision, CUDA) for the same three. Then one training step (value, gradient and an SGD update
of (A, V)) at (16, 1024, 32, 64, 1024) for the fused kernels at tensor-core precisions (pallas
tf32 and bf16, cudnn bf16; float32 without tensor cores is flop-bound there, and the XLA
implementation would hold (B, M, n, n) scores per layer).

Work counted (the minimal algorithmic work, as in flash attention): per (head, query, key) pair
4d flops and 1 exp forward, 10d flops and 1 exp more for the gradient (scores recomputed).
Achieved exp/s and TFLOP/s are that work over the median time, compared with the device's peaks
(H100/H200 SXM: 3.9e12 exp/s, 67 TFLOP/s float32 without tensor cores, 495 TFLOP/s TF32,
989 TFLOP/s bf16). Peak memory: XLA's `memory_analysis()` of the compiled function (arguments
+ outputs + temporaries) and, on GPU, the device's `peak_bytes_in_use`.

Writes `benchmarks/results/gpu-<time>.{json,md}`, prints the Markdown table and the targets:
fused forward >= 50% of the exp peak at n >= 1024; forward+gradient >= 1.5x faster than the
PyTorch peer at the same precision; the training step <= 3 s.

`--cpu-smoke` runs every code path at tiny sizes on the CPU (the PyTorch peer on CPU; Pallas in
interpret mode): proof that the script works end to end before it is run on a GPU. Compilation
dominates it (2-core CPU: 9 min wall under load, 80 s of CPU time).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from meanfield_tf import PRECISIONS, ChunkedKernel, CudnnKernel, DenseKernel, PallasKernel

SIZES = [(8, 256, 16, 16, 256), (16, 1024, 32, 16, 256), (1, 16384, 32, 2, 16)]
TRAIN_SIZE = (16, 1024, 32, 64, 1024)
SMOKE_SIZES = [(2, 24, 4, 2, 3), (1, 40, 8, 2, 2)]
SMOKE_TRAIN_SIZE = (2, 32, 8, 3, 4)

# per device kind: exp/s, and FLOP/s per precision policy
PEAKS = {
    "H100": {"exp": 3.9e12, "float32": 67e12, "tf32": 495e12, "bf16": 989e12},
    "H200": {"exp": 3.9e12, "float32": 67e12, "tf32": 495e12, "bf16": 989e12},
}
TARGET_EXP_FRACTION = 0.5
TARGET_TORCH_SPEEDUP = 1.5
TARGET_TRAIN_STEP_S = 3.0


def kernels_and_precisions(smoke: bool) -> list[tuple[str, str, object]]:
    """(kernel name, precision name, kernel). dense/chunked take the precision from the context."""
    blocks = dict(block_rows=16, block_keys=16) if smoke else {}
    out = []
    for prec in ("float32", "tf32"):
        out.append(("dense", prec, DenseKernel()))
        out.append(("chunked", prec, ChunkedKernel()))
    for prec, policy in PRECISIONS.items():
        out.append(("cudnn", prec, CudnnKernel(precision=policy)))
        out.append(("pallas", prec, PallasKernel(precision=policy, **blocks)))
    return out


def matmul_context(prec: str):
    """dense/chunked have no precision field: their matmuls follow the default precision."""
    return jax.default_matmul_precision("tensorfloat32" if prec == "tf32" else "highest")


def velocity_fn(kernel):
    return kernel.velocity


def flow_fn(kernel):
    vel = velocity_fn(kernel)

    def flow(A, V, x, w):
        L = A.shape[0]

        @jax.checkpoint
        def layer(x, AV):
            return x + vel(x, w, AV[0], AV[1]) / L, None

        return jax.lax.scan(layer, x, (A, V))[0]

    return flow


def risk(flow, A, V, x, w):
    x1 = flow(A, V, x, w)
    return jnp.mean(x1.astype(jnp.float32) ** 2)


def train_step_fn(kernel, lr=0.1):
    flow = flow_fn(kernel)

    def step(A, V, x, w):
        L, M = A.shape[:2]
        loss, (gA, gV) = jax.value_and_grad(lambda A, V: risk(flow, A, V, x, w), argnums=(0, 1))(A, V)
        # mean-field gradient L M dR/dtheta, one explicit Euler step of the gradient flow
        return loss, A - lr * L * M * gA, V - lr * L * M * gV

    return step


def problem(size, seed=0):
    B, n, d, L, M = size
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, n, d)).astype(np.float32)
    w = rng.uniform(0.5, 1.0, size=(B, n)).astype(np.float32)
    w[:, n - max(1, n // 16):] = 0  # some padding
    w /= w.sum(axis=1, keepdims=True)
    A = (rng.normal(size=(L, M, d, d)) / d).astype(np.float32)
    V = (rng.normal(size=(L, M, d, d)) / np.sqrt(d)).astype(np.float32)
    return tuple(jnp.asarray(a) for a in (A, V, x, w))


def memory_bytes(compiled) -> int | None:
    try:
        ma = compiled.memory_analysis()
        return int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)
    except Exception:
        return None


def device_peak_bytes() -> int | None:
    try:
        return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    except Exception:
        return None


def time_compiled(compiled, args, budget_s: float, max_reps: int) -> tuple[float, int]:
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def work(size, what: str) -> tuple[float, float]:
    """(flops, exps) of the minimal algorithm for `what` in velocity / forward / grad / train."""
    B, n, d, L, M = size
    pairs = B * M * n * n * (1 if what == "velocity" else L)
    if what in ("velocity", "forward"):
        return 4 * d * pairs, pairs
    return 14 * d * pairs, 2 * pairs


def measure_jax(name, prec, kernel, size, args, what, budget_s, max_reps, peaks):
    A, V, x, w = args
    row = {"size": list(size), "kernel": name, "precision": prec, "what": what}
    try:
        with matmul_context(prec):
            if what == "velocity":
                fn, fargs = velocity_fn(kernel), (x, w, A[0], V[0])
            elif what == "forward":
                fn, fargs = flow_fn(kernel), (A, V, x, w)
            elif what == "grad":
                flow = flow_fn(kernel)
                fn = jax.grad(lambda A, V, x, w: risk(flow, A, V, x, w), argnums=(0, 1))
                fargs = (A, V, x, w)
            else:
                fn, fargs = train_step_fn(kernel), (A, V, x, w)
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*fargs).compile()
            row["compile_s"] = time.perf_counter() - t0
        row["median_s"], row["reps"] = time_compiled(compiled, fargs, budget_s, max_reps)
        row["xla_bytes"] = memory_bytes(compiled)
        row["device_peak_bytes"] = device_peak_bytes()
        add_rates(row, size, what, peaks)
    except Exception as e:  # record and go on: one failing combination must not end the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc(limit=2)
    return row


def add_rates(row, size, what, peaks):
    flops, exps = work(size, "grad" if what == "train" else what)
    t = row["median_s"]
    row["tflops"] = flops / t / 1e12
    row["exp_per_s"] = exps / t
    if peaks:
        row["exp_fraction"] = row["exp_per_s"] / peaks["exp"]
        row["flop_fraction"] = flops / t / peaks[row["precision"]]


# --- the PyTorch peer -----------------------------------------------------------------------------


def torch_peer(size, args, prec, what, budget_s, max_reps, peaks, device):
    import torch
    import torch.nn.functional as F

    row = {"size": list(size), "kernel": "torch-sdpa", "precision": prec, "what": what}
    try:
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        torch.backends.cudnn.allow_tf32 = prec == "tf32"
        dt = torch.bfloat16 if prec == "bf16" else torch.float32
        A, V, x, w = (torch.as_tensor(np.asarray(a), device=device) for a in args)
        A.requires_grad_(what == "grad")
        V.requires_grad_(what == "grad")
        M = A.shape[1]
        mask = torch.where(w > 0, torch.log(w), torch.full_like(w, -float("inf")))[:, None, None, :].to(dt)

        def vel(x, A_l, V_l):
            q = torch.einsum("bnd,mde->bmne", x, A_l).to(dt)
            # one key/value head shared by the M query heads, broadcast as a stride-0 view (not
            # `enable_gqa`, which PyTorch's memory-efficient kernel -- the fused one that takes an
            # additive mask -- does not accept in every version)
            kv = x[:, None].to(dt).expand(-1, M, -1, -1)
            y = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, scale=1.0)
            return torch.einsum("bmnd,med->bne", y.float(), V_l) / M

        def flow():
            h = x
            L = A.shape[0]
            for layer in range(L):
                h = h + vel(h, A[layer], V[layer]) / L
            return h

        def run():
            if what == "velocity":
                with torch.no_grad():
                    return vel(x, A[0], V[0])
            if what == "forward":
                with torch.no_grad():
                    return flow()
            A.grad = V.grad = None
            loss = torch.mean(flow() ** 2)
            loss.backward()
            return loss

        if what == "velocity":  # the peer computes the same thing: compare with the dense kernel
            with matmul_context("float32"):
                ref = np.asarray(DenseKernel().velocity(args[2], args[3], args[0][0], args[1][0]))
            got = run().float().cpu().numpy()
            row["rel_diff_vs_dense"] = float(np.abs(got - ref).max() / np.abs(ref).max())
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run()
        sync()
        times = []
        start = time.perf_counter()
        while len(times) < max_reps and (not times or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
        row["median_s"], row["reps"] = statistics.median(times), len(times)
        if device == "cuda":
            row["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        add_rates(row, size, what, peaks)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc(limit=2)
    return row


# --- report ---------------------------------------------------------------------------------------


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
                "jax-cuda13-pjrt", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "nvidia-cublas-cu12",
                "nvidia-cublas", "triton", "torch", "equinox", "diffrax"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        out["nvidia-smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except Exception:
        pass
    return out


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(rows) -> str:
    head = ("| B, n, d, L, M | kernel | precision | what | median s | compile s | TFLOP/s | exp/s "
            "| % exp peak | % FLOP peak | XLA MB | device peak MB | note |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append("| " + " | ".join([
            ", ".join(map(str, r["size"])), r["kernel"], r["precision"], r["what"],
            fmt(r.get("median_s"), ".4g"), fmt(r.get("compile_s"), ".3g"), fmt(r.get("tflops"), ".3g"),
            fmt(r.get("exp_per_s"), ".3g"),
            fmt(100 * r["exp_fraction"], ".1f") if "exp_fraction" in r else "",
            fmt(100 * r["flop_fraction"], ".1f") if "flop_fraction" in r else "",
            fmt(r["xla_bytes"] / 2**20, ".0f") if r.get("xla_bytes") else "",
            fmt(r["device_peak_bytes"] / 2**20, ".0f") if r.get("device_peak_bytes") else "",
            r.get("error", "")[:80] or (f"vs dense {r['rel_diff_vs_dense']:.1e}" if "rel_diff_vs_dense" in r else ""),
        ]) + " |")
    return "\n".join(lines)


def targets(rows, peaks) -> list[str]:
    out = []
    ok = [r for r in rows if "median_s" in r]
    fused = [r for r in ok if r["kernel"] in ("pallas", "cudnn") and r["what"] == "forward" and r["size"][1] >= 1024]
    if peaks and fused:
        best = max(fused, key=lambda r: r["exp_fraction"])
        met = best["exp_fraction"] >= TARGET_EXP_FRACTION
        out.append(f"fused forward >= {TARGET_EXP_FRACTION:.0%} of exp peak at n >= 1024: "
                   f"{'MET' if met else 'MISSED'} (best {best['kernel']}/{best['precision']} at "
                   f"{tuple(best['size'])}: {best['exp_fraction']:.1%})")
    else:
        out.append("fused forward exp fraction: not measured (no device peaks or no n >= 1024 rows)")
    for r in ok:
        if r["kernel"] not in ("pallas", "cudnn") or r["what"] != "grad":
            continue
        peer = [p for p in ok if p["kernel"] == "torch-sdpa" and p["what"] == "grad"
                and p["size"] == r["size"] and p["precision"] == r["precision"]]
        if peer:
            speedup = peer[0]["median_s"] / r["median_s"]
            out.append(f"fwd+grad {r['kernel']}/{r['precision']} at {tuple(r['size'])}: {speedup:.2f}x "
                       f"the PyTorch peer ({'MET' if speedup >= TARGET_TORCH_SPEEDUP else 'MISSED'} "
                       f">= {TARGET_TORCH_SPEEDUP}x)")
    for r in ok:
        if r["what"] == "train":
            met = r["median_s"] <= TARGET_TRAIN_STEP_S
            out.append(f"training step {r['kernel']}/{r['precision']} at {tuple(r['size'])}: "
                       f"{r['median_s']:.3g} s ({'MET' if met else 'MISSED'} <= {TARGET_TRAIN_STEP_S} s)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: does every path run?")
    ap.add_argument("--kernels", default="dense,chunked,cudnn,pallas")
    ap.add_argument("--precisions", default="float32,tf32,bf16")
    ap.add_argument("--what", default="velocity,forward,grad")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed repetitions per row")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    smoke = args.cpu_smoke
    if smoke:
        jax.config.update("jax_platforms", "cpu")
    device = jax.devices()[0]
    kind = device.device_kind
    peaks = next((v for k, v in PEAKS.items() if k in kind), None)
    on_gpu = device.platform == "gpu"
    if not on_gpu and not smoke:
        print("benchmarks.gpu: no GPU visible to JAX; use --cpu-smoke on a CPU", file=sys.stderr)
        return 2
    sizes = SMOKE_SIZES if smoke else SIZES
    train_size = SMOKE_TRAIN_SIZE if smoke else TRAIN_SIZE
    budget = args.budget if args.budget is not None else (0.2 if smoke else 0.3)
    max_reps = 3 if smoke else 10
    kernel_set = set(args.kernels.split(","))
    prec_set = set(args.precisions.split(","))
    whats = args.what.split(",")
    torch_device = None
    if not args.no_torch:
        try:
            import torch

            torch_device = "cuda" if torch.cuda.is_available() else ("cpu" if smoke else None)
        except ImportError:
            print("benchmarks.gpu: torch not installed, no PyTorch peer", file=sys.stderr)

    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": kind, "platform": device.platform, "device_count": jax.device_count(),
              "peaks": peaks, "versions": versions(), "command": " ".join(sys.argv)}
    print(json.dumps(header, indent=1))
    rows = []
    start = time.perf_counter()
    for size in sizes:
        data = problem(size)
        for name, prec, kernel in kernels_and_precisions(smoke):
            if name not in kernel_set or prec not in prec_set:
                continue
            for what in whats:
                row = measure_jax(name, prec, kernel, size, data, what, budget, max_reps, peaks)
                rows.append(row)
                print(f"[{time.perf_counter() - start:6.1f}s] {size} {name:8s} {prec:7s} {what:8s} "
                      f"{row.get('median_s', row.get('error'))}", flush=True)
        if torch_device:
            for prec in ("float32", "tf32", "bf16"):
                if prec not in prec_set:
                    continue
                for what in whats:
                    row = torch_peer(size, data, prec, what, budget, max_reps, peaks, torch_device)
                    rows.append(row)
                    print(f"[{time.perf_counter() - start:6.1f}s] {size} torch    {prec:7s} {what:8s} "
                          f"{row.get('median_s', row.get('error'))}", flush=True)
        del data
    if not args.no_train:
        data = problem(train_size)
        for name, prec, kernel in kernels_and_precisions(smoke):
            fused = (name == "pallas" and prec in ("tf32", "bf16")) or (name == "cudnn" and prec == "bf16")
            if fused and name in kernel_set and prec in prec_set:
                row = measure_jax(name, prec, kernel, train_size, data, "train", budget, max_reps, peaks)
                rows.append(row)
                print(f"[{time.perf_counter() - start:6.1f}s] {train_size} {name} {prec} train "
                      f"{row.get('median_s', row.get('error'))}", flush=True)
    header["total_s"] = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    table = markdown(rows)
    goals = targets(rows, peaks)
    if smoke:
        goals = [f"(CPU smoke run: timings are not meaningful) {g}" for g in goals]
    (out / f"gpu-{stamp}.json").write_text(json.dumps({"header": header, "rows": rows, "targets": goals}, indent=1))
    (out / f"gpu-{stamp}.md").write_text(table + "\n\n" + "\n".join(f"- {g}" for g in goals) + "\n")
    print(table)
    print("\nTargets:")
    for g in goals:
        print(f"- {g}")
    print(f"\nwrote {out / f'gpu-{stamp}.json'} ({header['total_s']:.0f} s)")
    errors = [r for r in rows if "error" in r]
    if errors:
        print(f"{len(errors)} row(s) failed; see the 'note' column", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
