"""Depth solvers that diffrax does not ship under a familiar name."""

from __future__ import annotations

from typing import ClassVar

import diffrax
import numpy as np

_RK4_TABLEAU = diffrax.ButcherTableau(
    c=np.array([0.5, 0.5, 1.0]),
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # embedded midpoint rule (weights [0, 1, 0, 0]): a conservative, 2nd-order error estimate
    b_error=np.array([1 / 6, 1 / 3 - 1.0, 1 / 3, 1 / 6]),
)


class ClassicalRK4(diffrax.AbstractERK):
    """The classical 4th-order Runge–Kutta method (stages at 0, 1/2, 1/2, 1; weights 1/6, 1/3,
    1/3, 1/6). Meant for fixed steps; its error estimate is the embedded midpoint rule."""

    tableau: ClassVar[diffrax.ButcherTableau] = _RK4_TABLEAU
    interpolation_cls: ClassVar = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        del terms
        return 4
