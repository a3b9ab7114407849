r"""Singular-value tests of linear dependence: one column per sequence, one verdict.

A matrix with one column per sequence has a (near-)null vector exactly when the functions the
columns sample are (nearly) linearly dependent. `svd_dependence` declares the columns dependent
when $\sigma_{\min}/\sigma_{\max} \le$ safety $\times\ \varepsilon \times \sqrt{\text{rows}}$: the
size of the rounding errors of columns computed at their own magnitude (see `_injectivity.py`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Array, Float

from ._errors import InputError

DEFAULT_SAFETY = 100.0


@dataclasses.dataclass(frozen=True)
class DependenceTest:
    """Outcome of one singular-value test on a matrix with one column per sequence.

    - `ratio`: $\\sigma_{\\min}/\\sigma_{\\max}$ (0 when the matrix is zero).
    - `independent`: `ratio > threshold`.
    - `threshold`: safety × eps × sqrt(rows).
    - `null_vector`: `(B,)` the right singular vector of $\\sigma_{\\min}$, as coefficients
      $c_i$ on the unscaled functions (unit norm, first entry above 1e-6 positive): the
      (near-)dependence $\\sum_i c_i f_i \\approx 0$; its non-negligible entries name the
      sequences involved. With `nullity > 1` it is one vector of the null space.
    - `singular_values`: all singular values, decreasing, `(B,)`.
    - `nullity`: how many singular values are `<= threshold * sigma_max`.
    """

    ratio: float
    independent: bool
    threshold: float
    null_vector: np.ndarray
    singular_values: np.ndarray
    nullity: int

    def to_dict(self) -> dict:
        return {
            "ratio": float(self.ratio),
            "independent": bool(self.independent),
            "threshold": float(self.threshold),
            "null_vector": [float(c) for c in self.null_vector],
            "singular_values": [float(s) for s in self.singular_values],
            "nullity": int(self.nullity),
        }


def svd_dependence(columns: Float[Array, "rows B"], *, scales=None,
                   safety: float = DEFAULT_SAFETY) -> DependenceTest:
    """Singular-value test on `columns` `(rows, B)`: dependent iff σ_min/σ_max <= threshold.

    `scales` `(B,)` are the positive numbers the columns were divided by (default 1): the
    reported null vector is mapped back to coefficients on the unscaled columns, so that tests
    with different scalings report the same dependence.
    """
    cols = np.asarray(columns)
    rows, b = cols.shape
    if rows < b:
        raise InputError(
            f"a dependence test needs at least as many samples as sequences ({rows} < {b}); "
            f"raise num_samples"
        )
    eps = float(np.finfo(cols.dtype).eps)
    threshold = safety * eps * np.sqrt(rows)
    _, s, vt = np.linalg.svd(cols, full_matrices=False)
    smax = s[0]
    ratio = 0.0 if smax == 0 else float(s[-1] / smax)
    v = vt[-1] if scales is None else vt[-1] / np.asarray(scales)
    v = v / np.linalg.norm(v)
    v = v * np.sign(v[np.argmax(np.abs(v) > 1e-6)])  # first non-negligible entry positive
    nullity = int(np.sum(s <= threshold * smax)) if smax > 0 else b
    return DependenceTest(ratio=ratio, independent=bool(ratio > threshold), threshold=threshold,
                          null_vector=v, singular_values=s, nullity=nullity)


def column_scales(ref) -> np.ndarray:
    """The norm of every column (1 for a zero column): what each column is divided by."""
    norms = np.linalg.norm(np.asarray(ref), axis=0)
    return np.where(norms > 0, norms, 1.0)
