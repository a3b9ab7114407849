"""The uniform box's exact LSE, φ(t) = log((eᵗ − 1)/t), and its Hessian at full float64 precision.

Reference: 80-digit decimal arithmetic of φ and φ''(t) = 1/t² − eᵗ/(eᵗ − 1)², across the switch
between the Taylor series and the closed form (|t| = 1/2), near 0 and at large |t|.
"""

from decimal import Decimal, getcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield_tf as mf
from meanfield_tf._tokens import _log_expm1_ratio

getcontext().prec = 80


def _phi_ref(t: float) -> tuple[float, float]:
    d = Decimal(t)
    e = d.exp()
    phi = ((e - 1) / d).ln()
    hess = 1 / (d * d) - e / ((e - 1) ** 2)
    return float(phi), float(hess)


@pytest.mark.parametrize("t", [1e-9, 1e-4, 0.0999, 0.3, 0.4999, 0.5, 0.5001, 2.0, 30.0, 700.0])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_phi_and_hessian_full_precision(t, sign):
    t = sign * t
    phi, hess = _phi_ref(t)
    got = float(_log_expm1_ratio(jnp.asarray(t)))
    got_h = float(jax.grad(jax.grad(_log_expm1_ratio))(jnp.asarray(t)))
    eps = np.finfo(np.float64).eps
    assert abs(got - phi) <= 8 * eps * abs(phi)
    # the closed form's Hessian loses about eps/t² to cancellation; at |t| >= 1/2 that is 4 eps · 25
    assert abs(got_h - hess) <= 200 * eps * abs(hess)


def test_box_lse_is_a_sum_of_phi():
    box = mf.UniformBox(jnp.array([-1.0, 0.5]), jnp.array([2.0, 0.75]))
    z = jnp.array([0.3, -40.0])
    ref = sum(float(zi) * a + _phi_ref(float(zi) * (b - a))[0]
              for zi, a, b in zip(z, [-1.0, 0.5], [2.0, 0.75]))
    assert abs(float(box.lse(z)) - ref) <= 1e-14 * abs(ref)
