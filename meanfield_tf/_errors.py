"""Errors raised on bad input, and the checks that raise them.

Every check names the offending argument, says what is wrong with it, and says how to fix it,
in one line, so that the CLI can print it without a traceback.
"""

from __future__ import annotations

import numpy as np


class MeanFieldError(ValueError):
    """Base class of every error meanfield_tf raises on bad input or a failed solve."""


class InputError(MeanFieldError):
    """An argument has the wrong shape, dtype or value."""


class ConfigError(MeanFieldError):
    """A configuration file or override is malformed (unknown key, wrong type, bad value)."""


class SolverError(MeanFieldError):
    """A differential-equation solve did not reach the end of the depth interval."""


def concrete_or_none(value):
    """The value as a NumPy array, or `None` when it is a tracer (inside `jit`)."""
    try:
        return np.asarray(value)
    except Exception:  # a JAX tracer cannot be converted: checks are skipped under jit
        return None


def check_real(name: str, value, dtype=None) -> None:
    """Raise `InputError` unless a concrete `value` is real numbers (not complex, strings or
    objects) that fit `dtype` (a float64 value beyond float32's range does not fit float32)."""
    arr = concrete_or_none(value)
    if arr is None:
        return
    if arr.dtype.kind == "c":
        raise InputError(f"{name} is complex ({arr.dtype}); the model acts on real tokens: pass "
                         f"the real part (x.real) or the real and imaginary parts as coordinates")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name} has dtype {arr.dtype}, not numbers; give a numeric array")
    if dtype is not None and arr.dtype.kind == "f" and np.dtype(dtype).itemsize < arr.dtype.itemsize:
        finite = arr[np.isfinite(arr)]
        big = float(np.abs(finite).max()) if finite.size else 0.0
        if big > np.finfo(dtype).max:
            raise InputError(f"{name} holds values up to {big:.3g}, beyond {np.dtype(dtype).name}'s "
                             f"range ({np.finfo(dtype).max:.3g}); use float64 or rescale the input")


def check_shape(name: str, value, shape: tuple, fix: str = "") -> None:
    """Raise `InputError` unless `value.shape` matches `shape` (`None` entries match anything)."""
    got = tuple(np.shape(value))
    ok = len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got))
    if not ok:
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        msg = f"{name} has shape {got}, expected {want}"
        raise InputError(msg + (f"; {fix}" if fix else ""))


def check_finite(name: str, value) -> None:
    """Raise `InputError` if a concrete `value` holds NaN or inf (no-op under `jit`)."""
    arr = concrete_or_none(value)
    if arr is None or arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf), first at index "
            f"{first}; clean or drop those entries before simulating"
        )


def check_weights(name: str, w, *, atol: float | None = None) -> None:
    """Raise `InputError` unless concrete weights are ≥ 0 and each row sums to 1.

    The row sums are taken in float64 on the host, so the check does not depend on `n`: a row of
    float32 weights normalised in float32 sums to 1 within a few float32 roundings whatever its
    length, and the default tolerance (`1e-5` for float32 input, `1e-10` for float64) is fixed.
    """
    check_finite(name, w)
    arr = concrete_or_none(w)
    if arr is None:
        return
    if (arr < 0).any():
        first = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise InputError(
            f"{name} has negative entries (first at index {first}); token weights must be >= 0 "
            f"(use 0 for padding)"
        )
    sums = arr.astype(np.float64).sum(axis=-1)
    if atol is None:
        atol = 1e-10 if arr.dtype == np.float64 else 1e-5
    bad = np.abs(sums - 1) > atol
    if bad.any():
        i = int(np.argwhere(np.atleast_1d(bad))[0][0])
        s_i = float(np.atleast_1d(sums)[i])
        raise InputError(
            f"{name} rows must sum to 1 (each sequence is a probability measure); row {i} sums to "
            f"{s_i:.10g}; divide each row by its sum (in float64 for long rows)"
        )


def check_chunk_size(chunk_size: int) -> None:
    """Raise `InputError` unless a kernel's `chunk_size` is at least 1."""
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
