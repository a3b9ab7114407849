r"""The CPU's hand-fused attention rows: a small C++ kernel, compiled on first use and called by XLA.

XLA's CPU backend runs the memory-linear attention of `_flash.py` as separate operations — a thin
matrix product for the scores, an `exp` loop, another thin product for the weighted means — each
streaming its `(rows, keys)` block through memory. `_native/flash_attention_cpu.cc` does the same
arithmetic in one pass per (head, query) row, in SIMD registers, over XLA's own intra-op threads
(the XLA FFI). For the rows $z_i$ of one sequence with keys $x_j$ and log-weights $l_j$:

- forward: $s_{ij} = z_i^\top x_j + l_j$, $\ell_i = \log\sum_j e^{s_{ij}}$,
  $y_i = \sum_j e^{s_{ij} - \ell_i} x_j$;
- backward, for cotangents $g_i$ of $y_i$ and $D_i = g_i^\top y_i$:
  $\bar s_{ij} = p_{ij}(g_i^\top x_j - D_i)$, $\bar z_i = \sum_j \bar s_{ij} x_j$,
  $\bar x_j = \sum_i p_{ij} g_i + \bar s_{ij} z_i$, $\bar l_j = \sum_i \bar s_{ij}$.

These are exactly the quantities the XLA path computes (`_flash._fwd_block`, `_flash._bwd_block`);
float64 runs use the C library's `exp`, float32 runs a vectorised `exp` of about one ulp.

**Build.** The source is compiled once per (source, compiler, CPU, jaxlib) into a cache directory
(`$MEANFIELD_TF_CACHE_DIR`, else `$XDG_CACHE_HOME/meanfield_tf` or `~/.cache/meanfield_tf`),
written under a temporary name and renamed into place, so concurrent processes never load a
half-written library. It needs a C++17 compiler (`$CXX`, default `g++`); `-march=native`, so the
cache key includes the CPU's feature flags.

**Mode** (`set_native_kernels`, or the environment variable `MEANFIELD_TF_NATIVE` at import):

- `"auto"` (default): use the kernel for float32/float64 and head dimension `d <= 64` when it
  builds, else keep the XLA path (silently when there is no compiler, with one warning when the
  compiler fails);
- `"on"`: the same, but a failed build raises `InputError` with the compiler's message;
- `"off"`: always the XLA path.

Only the CPU is affected (`native_or_xla`): on a machine without an accelerator the native branch is
the only one traced; where JAX's default backend is a GPU or TPU, `jax.lax.platform_dependent`
keeps XLA's blocks for those lowerings and the kernel for computations placed on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._errors import InputError

SOURCE = Path(__file__).parent / "_native" / "flash_attention_cpu.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-w")
MAX_HEAD_DIM = 64
MODES = ("auto", "on", "off")
_TARGETS = {
    ("forward", np.dtype(np.float32)): "mft_flash_forward_f32",
    ("forward", np.dtype(np.float64)): "mft_flash_forward_f64",
    ("backward", np.dtype(np.float32)): "mft_flash_backward_f32",
    ("backward", np.dtype(np.float64)): "mft_flash_backward_f64",
    ("step_forward", np.dtype(np.float32)): "mft_step_forward_f32",
    ("step_forward", np.dtype(np.float64)): "mft_step_forward_f64",
    ("step_backward", np.dtype(np.float32)): "mft_step_backward_f32",
    ("step_backward", np.dtype(np.float64)): "mft_step_backward_f64",
    ("exp", np.dtype(np.float32)): "mft_exp_rate_f32",
}


@dataclasses.dataclass(frozen=True)
class NativeKernelStatus:
    """Whether the native CPU attention kernel is in use, and why not if it is not.

    - `mode`: `"auto"`, `"on"` or `"off"`;
    - `available`: the library is built and registered with XLA;
    - `library`: its path (or `None`);
    - `reason`: why it is unavailable (`""` when available, or not yet tried).
    """

    mode: str
    available: bool
    library: str | None
    reason: str


_lock = threading.Lock()
_state: dict = {"mode": None, "built": None, "library": None, "reason": ""}


def _checked(mode: str, what: str = "native kernel mode", fix: str = "") -> str:
    if mode not in MODES:
        raise InputError(f"{what} must be one of {', '.join(MODES)}, got {mode!r}{fix}")
    return mode


def _initial_mode() -> str:
    return _checked(os.environ.get("MEANFIELD_TF_NATIVE", "auto").strip().lower(),
                    "MEANFIELD_TF_NATIVE", "; unset it for the default (auto)")


def set_native_kernels(mode: str) -> str:
    """Choose whether CPU attention runs the native kernel: `"auto"`, `"on"` or `"off"`
    (module docstring). Returns the previous mode. Clears JAX's compilation caches, since
    functions traced before the change would keep the old choice."""
    previous = native_mode()
    _state["mode"] = _checked(mode)
    if mode != previous:
        jax.clear_caches()
    return previous


@contextlib.contextmanager
def native_kernels(mode: str):
    """`with native_kernels("off"): ...` — the mode for the functions traced inside the block
    (and restored after). It does not clear JAX's caches: use it around a first trace (as the
    benchmarks do), or use `set_native_kernels` for a lasting change."""
    previous = native_mode()
    _state["mode"] = _checked(mode)
    try:
        yield
    finally:
        _state["mode"] = previous


def native_mode() -> str:
    if _state["mode"] is None:
        _state["mode"] = _initial_mode()
    return _state["mode"]


def _cache_dir() -> Path:
    explicit = os.environ.get("MEANFIELD_TF_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meanfield_tf"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.stdout.encode(),
                 _cpu_flags().encode(), platform.machine().encode(), jax.__version__.encode(),
                 str(jax.ffi.include_dir()).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _writable_dir() -> Path:
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"meanfield_tf-{os.getuid()}"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if os.access(directory, os.W_OK):
                return directory
        except OSError:
            continue
    raise OSError("no writable cache directory (set MEANFIELD_TF_CACHE_DIR)")


def build_library() -> Path:
    """Compile the kernel if its cached build is missing; return the library's path.

    Raises `RuntimeError` with the reason (no compiler, compiler errors)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(
            f"no C++ compiler found ({os.environ.get('CXX', 'g++')!r} is not on PATH; "
            f"install g++ or set CXX)"
        )
    directory = _writable_dir()
    target = directory / f"flash_attention_cpu-{_build_key(compiler)}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=directory)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> bool:
    """Build and register the kernel once per process; True when it is usable."""
    with _lock:
        if _state["built"] is None:
            try:
                path = build_library()
                lib = ctypes.cdll.LoadLibrary(str(path))
                for name in _TARGETS.values():
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                                platform="cpu")
                _state.update(built=True, library=str(path), reason="")
            except Exception as err:  # no compiler, a compile error, an unloadable library
                _state.update(built=False, library=None, reason=str(err))
                # without a compiler the XLA path is the expected setup (the slim Docker image):
                # no warning; a compiler that fails is a problem worth one
                if native_mode() == "auto" and _compiler() is not None:
                    warnings.warn(
                        f"meanfield_tf: the native CPU attention kernel is unavailable, using "
                        f"the XLA path (slower on CPU): {err}", RuntimeWarning, stacklevel=3)
        if not _state["built"] and native_mode() == "on":
            raise InputError(
                f"the native CPU attention kernel was requested (mode 'on') but is unavailable: "
                f"{_state['reason']}; install a C++ compiler or use set_native_kernels('auto')"
            )
        return bool(_state["built"])


def native_kernel_status() -> NativeKernelStatus:
    """Build the kernel if needed (unless the mode is `"off"`) and report its state."""
    mode = native_mode()
    if mode != "off":
        try:
            _load()
        except InputError:
            pass
    return NativeKernelStatus(mode=mode, available=bool(_state["built"]),
                              library=_state["library"], reason=_state["reason"])


def native_usable(dtype, d: int) -> bool:
    """Whether attention of this dtype and head dimension runs the native kernel on the CPU."""
    if native_mode() == "off":
        return False
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)) or not 1 <= d <= MAX_HEAD_DIM:
        return False
    return _load()


def native_or_xla(use_native: bool, native_fn, xla_fn, *args):
    """`xla_fn(*args)` unless `use_native`; then `native_fn(*args)` where the computation runs on
    the CPU and `xla_fn(*args)` elsewhere.

    Without an accelerator (JAX's default backend is the CPU) only the native branch is traced;
    otherwise `jax.lax.platform_dependent` picks the branch when the computation is lowered."""
    if not use_native:
        return xla_fn(*args)
    if jax.default_backend() == "cpu":
        return native_fn(*args)
    return jax.lax.platform_dependent(*args, cpu=native_fn, default=xla_fn)


def native_rows_forward(
    z: Float[Array, "*batch R d"], x: Float[Array, "*batch n d"], lw: Float[Array, "*batch n"]
) -> tuple[Float[Array, "*batch R d"], Float[Array, "*batch R"]]:
    """Row means `y` and log-sum-exps `lse` of the query rows `z` against keys = values `x`
    with log-weights `lw` (`-inf` for weight 0), by the native kernel (CPU only)."""
    out = (jax.ShapeDtypeStruct(z.shape, z.dtype), jax.ShapeDtypeStruct(z.shape[:-1], z.dtype))
    call = jax.ffi.ffi_call(_TARGETS[("forward", np.dtype(z.dtype))], out,
                            vmap_method="broadcast_all")
    return call(z, x.astype(z.dtype), lw.astype(z.dtype))


def native_rows_backward(z, x, lw, lse, gy, D):
    """Cotangents `(dz, dx, dlw)` of the rows `z` `(..., R, d)`, keys/values `x` `(..., n, d)` and
    log-weights `lw` `(..., n)`, for the cotangents `gy` of the row means and `D = Σ gy·y`."""
    dtype = z.dtype
    out = (jax.ShapeDtypeStruct(z.shape, dtype), jax.ShapeDtypeStruct(x.shape, dtype),
           jax.ShapeDtypeStruct(lw.shape, dtype))
    call = jax.ffi.ffi_call(_TARGETS[("backward", np.dtype(dtype))], out,
                            vmap_method="broadcast_all")
    return call(z, x.astype(dtype), lw.astype(dtype), lse.astype(dtype), gy.astype(dtype),
                D.astype(dtype))


def native_step_forward(
    x: Float[Array, "B n d"], lw: Float[Array, "B n"], A: Float[Array, "M d d"],
    V: Float[Array, "M d d"],
) -> tuple[Float[Array, "B n d"], Float[Array, "B n M d"], Float[Array, "B n M"]]:
    r"""One Euler step's attention for the batch, in one native call: the velocity
    $v_i = \frac1M\sum_m V_m y_{mi}$ `(B, n, d)`, the head means $y$ `(B, n, M, d)` and the row
    log-sum-exps `(B, n, M)` of the queries $z_{mi} = A_m^\top x_i$ against keys = values $x$."""
    B, n, d = x.shape
    M = A.shape[0]
    dtype = x.dtype
    out = (jax.ShapeDtypeStruct((B, n, d), dtype), jax.ShapeDtypeStruct((B, n, M, d), dtype),
           jax.ShapeDtypeStruct((B, n, M), dtype))
    call = jax.ffi.ffi_call(_TARGETS[("step_forward", np.dtype(dtype))], out,
                            vmap_method="sequential")
    return call(x, lw.astype(dtype), A.astype(dtype), V.astype(dtype))


def native_step_backward(x, lw, A, V, y, lse, g):
    r"""Cotangents of `native_step_forward` for the velocity cotangent `g` `(B, n, d)`:
    `dx` `(B, n, d)` (the query, key and value roles of the tokens), `dlw` `(B, n)` (of the
    log-weights), `dA`, `dV` `(M, d, d)` (summed over the batch), from the saved `y`, `lse`."""
    B, n, d = x.shape
    M = A.shape[0]
    dtype = x.dtype
    out = (jax.ShapeDtypeStruct((B, n, d), dtype), jax.ShapeDtypeStruct((B, n), dtype),
           jax.ShapeDtypeStruct((M, d, d), dtype), jax.ShapeDtypeStruct((M, d, d), dtype))
    call = jax.ffi.ffi_call(_TARGETS[("step_backward", np.dtype(dtype))], out,
                            vmap_method="sequential")
    return call(x, lw.astype(dtype), A.astype(dtype), V.astype(dtype), y.astype(dtype),
                lse.astype(dtype), g.astype(dtype))


def scratch_bytes(kind: str, B: int, n: int, d: int, M: int, itemsize: int,
                  threads: int) -> int:
    """Bytes the native kernel allocates outside XLA's buffers during one call (an upper bound,
    mirroring `flash_attention_cpu.cc`): `kind` is `"rows_forward"`, `"step_forward"` or
    `"step_backward"`; `threads` is the size of XLA's intra-op pool (the CPU count). All of it
    is linear in `n`: transposed keys, score rows, and per-task key cotangents."""
    W = 64 // itemsize
    npad = -(-n // (4 * W)) * (4 * W)
    want = max(1, -(-2 * max(threads, 1) // B))
    if kind == "rows_forward":
        per_task = d * npad + 2 * npad
        return itemsize * threads * per_task
    tt = max(1, 64 // M)
    rt = tt * M
    chunks = max(1, min(want, n, n * M // 64))
    tasks = B * chunks
    if kind == "step_forward":
        return itemsize * (M * d * d + threads * (d * npad + 2 * npad + rt * d))
    if kind == "step_backward":
        per_task = d * npad + npad + 2 * 16 * npad + 3 * rt * d + rt
        shared = tasks * ((d + 1) * npad + 2 * M * d * d) + M * d * d
        return itemsize * (shared + threads * per_task)
    raise InputError(f"kind must be rows_forward, step_forward or step_backward, got {kind!r}")


def native_exp_neg_abs(x: Float[Array, "..."], reps: int = 1) -> Float[Array, "..."]:
    """`reps` times `x <- exp(-|x|)` on a float32 array, by the kernel's own vectorised `exp`
    (for measuring this CPU's exp throughput: `benchmarks/roofline.py`)."""
    call = jax.ffi.ffi_call(_TARGETS[("exp", np.dtype(np.float32))],
                            jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), reps=np.int64(reps))
