"""The file formats of the command line: token, head and target `.npz` files, atomic writes.

Every reader validates what it loads and raises `InputError` naming the file, the key and the fix.
Every writer is atomic (temporary file, fsync, rename): a reader sees the old file or the new one.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .._errors import InputError, check_finite, check_real, check_shape
from .._heads import HeadMeasure
from .._tokens import TokenBatch


def _open_npz(path, required: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{what} file {str(path)!r} is not a readable .npz archive ({err})") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise InputError(
            f"{what} file {str(path)!r} lacks key(s) {missing} (it has {sorted(arrays)}); "
            f"save it with np.savez(path, {', '.join(f'{k}=...' for k in required)})"
        )
    return arrays


def load_tokens(path, dtype=None) -> TokenBatch:
    """Tokens from an `.npz` with key `x` `(B, n, d)` and optional `w` `(B, n)` (uniform if absent)."""
    data = _open_npz(path, ("x",), "tokens")
    x = np.asarray(data["x"])
    dtype = dtype or (x.dtype if x.dtype.kind == "f" else np.float32)
    w = data.get("w")
    try:
        check_real(f"tokens x in {path}", x, dtype)
        if w is not None:
            check_real(f"token weights w in {path}", w, dtype)
        return TokenBatch(jnp.asarray(x, dtype), None if w is None else jnp.asarray(w, dtype))
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def load_heads(path, dtype=None, interpolation: str | None = None) -> HeadMeasure:
    """Heads from an `.npz` with keys `A` and `V`, each `(L, M, d, d)` (or `Q`, `K`, `V` factored),
    and MLP units `U`, `W` `(L, M', d)`, `b` `(L, M')` if the file has any of them.

    The depth interpolation is `interpolation`, else the file's `interpolation` key (written by
    `meanfield-tf export`), else `"piecewise"`; a flag that contradicts the file is refused.
    """
    probe = _open_npz(path, ("V",), "heads")
    required = ("Q", "K", "V") if "Q" in probe and "A" not in probe else ("A", "V")
    if any(k in probe for k in ("U", "W", "b")):  # MLP units: all three
        required = (*required, "U", "W", "b")
    data = _open_npz(path, required, "heads")
    recorded = str(data["interpolation"]) if "interpolation" in data else None
    if interpolation is not None and recorded is not None and interpolation != recorded:
        raise InputError(f"heads file {str(path)!r} records interpolation {recorded!r} but "
                         f"--interpolation {interpolation} was given; drop the flag")
    interpolation = interpolation or recorded or "piecewise"
    dtype = dtype or (data["V"].dtype if data["V"].dtype.kind == "f" else np.float32)
    for k in required:
        check_real(f"heads {k} in {path}", data[k], dtype)
    arrays = {k: jnp.asarray(data[k], dtype) for k in required}
    try:
        return HeadMeasure(**arrays, interpolation=interpolation)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def load_array(path, key: str, what: str, shape: tuple, dtype) -> jnp.ndarray:
    """One array `key` from an `.npz`, checked against `shape` (`None` matches anything) and finiteness."""
    data = _open_npz(path, (key,), what)
    arr = data[key]
    check_real(f"{what} {key} in {path}", arr, dtype)
    check_shape(f"{what} {key} in {path}", arr, shape)
    check_finite(f"{what} {key} in {path}", arr)
    return jnp.asarray(arr, dtype)


def check_output_path(path, what: str = "output") -> None:
    """Raise `InputError` now if `path` could not be written later: a directory, or under a
    file (so that a long computation is not lost at its end, and nothing is half written)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a directory; give a file name to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot write {what} {str(path)!r}: a parent of it is a file; "
                                 f"choose another path")
            break


def atomic_write(path, write) -> None:
    """Write through `write(file)` into a temporary file beside `path`, fsync it, then rename it
    over `path`: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a directory; give a file name to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"cannot write {str(path)!r}: a parent of it is a file; choose another "
                         f"path") from None
    except PermissionError:
        raise InputError(f"cannot write {str(path)!r}: permission denied; choose a writable "
                         f"path") from None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except PermissionError:
        raise InputError(f"cannot write {str(path)!r}: its folder is not writable; choose a "
                         f"writable path") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the mode of any new file (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_npz_atomic(path, **arrays) -> None:
    """Write an `.npz` atomically (see `atomic_write`)."""
    atomic_write(path, lambda fh: np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()}))
