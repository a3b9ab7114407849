r"""MLP units: the second particle family of the transformer block, and the block's rule.

A unit is $\theta' = (u, w, b)$ with $u, w \in \mathbb{R}^d$, $b \in \mathbb{R}$. It moves every
token on its own (no interaction between tokens):

$$m_{\theta'}(x) = u\, \sigma(\langle w, x\rangle + b), \qquad
  v'[\nu'_s](x) = \int m_{\theta'}(x)\, d\nu'_s(\theta') = \frac{1}{M'} \sum_{j} u_j\,
  \sigma(\langle w_j, x\rangle + b_j),$$

with the same depth cells and interpolation as the heads (arrays `U`, `W` `(N, M', d)` and `b`
`(N, M')` inside `HeadMeasure.params`), scaling $1/M'$ per unit and $1/L$ per layer.

**Composition** (`Block.composition`), for the attention velocity $v$ and the unit velocity $v'$:

- `"sum"` (default): one vector field $dX/ds = v(X) + v'(X)$. Every diffrax solver and adaptive
  stepping integrate it; it is the continuous-depth model.
- `"sequential"`: the finite transformer block, within each Euler step of size $h$
  $Y = X + h\,v(X)$, then $X \leftarrow Y + h\,v'(Y)$. Written as one field
  $v(X) + v'(X + h\,v(X))$ stepped by explicit Euler, so it is refused with any other solver.
  It differs from the sum by $O(h)$ per unit depth: both have the same depth limit.

**Closed forms** (no autodiff), with $z = \langle w, x\rangle + b$ and $c = \langle u, \lambda\rangle$:

$$D_x m^\top \lambda = c\,\sigma'(z)\, w, \qquad
  \nabla_u \langle\lambda, m\rangle = \sigma(z)\,\lambda, \quad
  \nabla_w \langle\lambda, m\rangle = c\,\sigma'(z)\, x, \quad
  \nabla_b \langle\lambda, m\rangle = c\,\sigma'(z).$$

There is no non-local term: a unit acts on each token alone.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._errors import InputError

UNIT_KEYS = ("U", "W", "b")


class AbstractActivation(eqx.Module):
    """An activation $\\sigma$ with its derivative in closed form."""

    @abc.abstractmethod
    def __call__(self, z: Array) -> Array:
        """$\\sigma(z)$, elementwise."""

    @abc.abstractmethod
    def derivative(self, z: Array) -> Array:
        """$\\sigma'(z)$, elementwise."""


class Tanh(AbstractActivation):
    """$\\sigma = \\tanh$, $\\sigma' = 1 - \\tanh^2$."""

    def __call__(self, z):
        return jnp.tanh(z)

    def derivative(self, z):
        return 1 - jnp.tanh(z) ** 2


class ReLU(AbstractActivation):
    """$\\sigma(z) = \\max(z, 0)$, $\\sigma'(z) = 1_{z > 0}$ (0 at the kink)."""

    def __call__(self, z):
        return jnp.maximum(z, 0)

    def derivative(self, z):
        return (z > 0).astype(z.dtype)


class GELU(AbstractActivation):
    """The exact GELU $\\sigma(z) = z\\,\\Phi(z)$, $\\sigma'(z) = \\Phi(z) + z\\,\\varphi(z)$."""

    def __call__(self, z):
        return z * jax.scipy.stats.norm.cdf(z)

    def derivative(self, z):
        return jax.scipy.stats.norm.cdf(z) + z * jax.scipy.stats.norm.pdf(z)


_COMPOSITIONS = ("sum", "sequential")


class Block(eqx.Module):
    """How the MLP units act in a transformer block: their activation and the composition rule
    with attention (`"sum"`, default, or `"sequential"`; see the module docstring). Without units
    in the head measure the block changes nothing."""

    activation: AbstractActivation = Tanh()
    composition: str = eqx.field(static=True, default="sum")

    def __check_init__(self):
        if not isinstance(self.activation, AbstractActivation):
            raise InputError(f"Block.activation must be Tanh(), ReLU() or GELU(), got "
                             f"{type(self.activation).__name__}")
        if self.composition not in _COMPOSITIONS:
            raise InputError(f"Block.composition must be one of {_COMPOSITIONS}, got "
                             f"{self.composition!r}")

    @property
    def sequential(self) -> bool:
        return self.composition == "sequential"

    def velocity(self, x: Float[Array, "B n d"], params: dict[str, Array]) -> Float[Array, "B n d"]:
        r"""$v'(x) = \frac{1}{M'}\sum_j u_j \sigma(\langle w_j, x\rangle + b_j)$ per token, for
        the units `U`, `W` `(M', d)`, `b` `(M',)` of `params`."""
        z = jnp.einsum("...d,jd->...j", x, params["W"]) + params["b"]
        return jnp.einsum("...j,jd->...d", self.activation(z), params["U"]) / params["U"].shape[0]

    def step(self, x: Float[Array, "B n d"], y: Float[Array, "B n d"], params, h):
        """After the attention update `y = x + h v(x)` of an Euler step: `y + h v'(x)` (sum) or
        `y + h v'(y)` (sequential). Without units: `y`."""
        if "U" not in params:
            return y
        return y + h * self.velocity(y if self.sequential else x, params)

    def adjoint_and_gradient(
        self, x: Float[Array, "B n d"], lam: Float[Array, "B n d"], params: dict[str, Array]
    ) -> tuple[Float[Array, "B n d"], dict[str, Array]]:
        r"""Closed forms at states `x` and positional adjoints `lam`: the unit-averaged
        $(\partial v'/\partial X)^\top \lambda$ `(B, n, d)`, and the gradient field
        $\nabla_{\theta'} G = \frac1B \sum_i \sum_k \nabla_{\theta'}\langle \lambda^i_k,
        m_{\theta'}(x^i_k)\rangle$ at every unit (`U`, `W` `(M', d)`, `b` `(M',)`)."""
        U, W = params["U"], params["W"]
        z = jnp.einsum("bnd,jd->bnj", x, W) + params["b"]
        c = jnp.einsum("bnd,jd->bnj", lam, U) * self.activation.derivative(z)
        adj = jnp.einsum("bnj,jd->bnd", c, W) / U.shape[0]
        B = x.shape[0]
        grads = {"U": jnp.einsum("bnj,bnd->jd", self.activation(z), lam) / B,
                 "W": jnp.einsum("bnj,bnd->jd", c, x) / B,
                 "b": jnp.sum(c, axis=(0, 1)) / B}
        return adj, grads


def unit_params(params: dict[str, Array]) -> dict[str, Array]:
    """The unit entries of a parameter dict (empty without units)."""
    return {k: params[k] for k in UNIT_KEYS if k in params}


def head_params(params: dict[str, Array]) -> dict[str, Array]:
    """The attention-head entries of a parameter dict."""
    return {k: v for k, v in params.items() if k not in UNIT_KEYS}


def gaussian_units(
    key: PRNGKeyArray,
    num_layers: int,
    num_units: int,
    dim: int,
    *,
    scale_U: float = 1.0,
    scale_W: float = 1.0,
    scale_b: float = 0.0,
    symmetric: bool = False,
    interpolation: str = "piecewise",
    dtype=None,
) -> dict[str, Array]:
    r"""I.i.d. Gaussian units: entries of $u$ and $w$ $N(0, \sigma^2/d)$ (so $|u|, |w| =
    O(\sigma)$ whatever $d$), $b \sim N(0, \sigma_b^2)$, on `num_layers` cells (`L + 1` nodes for
    `interpolation="linear"`). `symmetric=True` pairs unit $j$ with $(-u_j, w_j, b_j)$
    (`num_units` even): the unit velocity is then zero. Returns the dict `{"U", "W", "b"}`, for
    `HeadMeasure.with_units(**units)`."""
    if num_units < 1 or (symmetric and num_units % 2):
        raise InputError(f"num_units must be >= 1 (even when symmetric), got {num_units}")
    if num_layers < 1:
        raise InputError(f"num_layers must be >= 1, got {num_layers}")
    num_cells = num_layers + 1 if interpolation == "linear" else num_layers
    dtype = dtype or jnp.result_type(float)
    m = num_units // 2 if symmetric else num_units
    kU, kW, kb = jax.random.split(key, 3)
    sd = jnp.sqrt(jnp.asarray(dim, dtype))
    U = scale_U / sd * jax.random.normal(kU, (num_cells, m, dim), dtype)
    W = scale_W / sd * jax.random.normal(kW, (num_cells, m, dim), dtype)
    b = scale_b * jax.random.normal(kb, (num_cells, m), dtype)
    if symmetric:
        U, W, b = jnp.concatenate([U, -U], 1), jnp.concatenate([W, W], 1), jnp.concatenate([b, b], 1)
    return {"U": U, "W": W, "b": b}
