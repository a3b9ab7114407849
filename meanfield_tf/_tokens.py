r"""Token measures: batches of weighted sequences, and the families they are drawn from.

A sequence is a probability measure $\mu = \sum_k w_k \delta_{x_k}$ on $\mathbb{R}^d$ with
$w_k \ge 0$, $\sum_k w_k = 1$; a token of weight 0 is padding (it still moves, as a query, but
is invisible as a key). A batch of $B$ sequences of $n$ tokens is a `TokenBatch` with `x` of
shape `(B, n, d)` and `w` of shape `(B, n)`.

The families (`Discrete`, `Gaussian`, `GaussianMixture`, `UniformBox`, `UniformBall`) are
analytic measures. Each one draws an empirical sequence (`tokens`) and evaluates its exact
log-sum-exp (log-Laplace transform)

$$\mathrm{LSE}_\mu(z) = \log \int e^{\langle z, y\rangle}\, d\mu(y),$$

which is what the attention of a head sees in the infinite-token limit and what the NTK
injectivity criterion is stated in.
"""

from __future__ import annotations

from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._errors import InputError, check_finite, check_real, check_shape, check_weights


class TokenBatch(eqx.Module):
    """A batch of `B` weighted token sequences (discrete probability measures on R^d).

    **Fields:**

    - `x`: token positions, shape `(B, n, d)`.
    - `w`: token weights, shape `(B, n)`; each row is ≥ 0 and sums to 1; 0 marks padding.

    Constructing one from concrete arrays validates shapes, finiteness and weights; pass
    `w=None` for uniform weights `1/n`.
    """

    x: Float[Array, "B n d"]
    w: Float[Array, "B n"]

    def __init__(self, x, w=None, *, check: bool = True):
        if check:
            check_real("tokens x", x)
            if w is not None:
                check_real("token weights w", w)
        x = jnp.asarray(x)
        if x.ndim != 3:
            raise InputError(
                f"tokens x has shape {tuple(x.shape)}, expected (B, n, d): a batch of B sequences "
                f"of n tokens in dimension d (add a leading axis for a single sequence)"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.result_type(float))
        b, n, d = x.shape
        if n == 0:
            raise InputError("tokens x has no tokens (n = 0); every sequence needs at least one token")
        if b == 0:
            raise InputError("tokens x has no sequences (B = 0); give at least one sequence")
        if d == 0:
            raise InputError("tokens x live in dimension d = 0; tokens need at least one coordinate")
        if w is None:
            w = jnp.full((b, n), 1.0 / n, dtype=x.dtype)
        w = jnp.asarray(w, dtype=x.dtype)
        if check:
            check_shape("token weights w", w, (b, n), "w must have one weight per token of x")
            check_finite("tokens x", x)
            check_weights("token weights w", w)
        self.x = x
        self.w = w

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    @property
    def dim(self) -> int:
        return self.x.shape[2]

    def append_query(self, e: Float[Array, " d"] | Float[Array, "B d"]) -> "TokenBatch":
        """Append a readout query token to every sequence, with weight 0.

        `e` is one query `(d,)` shared by every sequence, or one per sequence `(B, d)`. A
        zero-weight token moves with the flow (it is a query) but is invisible as a key, so the
        measure of every sequence is unchanged. Its final position is the sequence's readout.
        """
        e = jnp.asarray(e, self.x.dtype)
        e = jnp.broadcast_to(e[..., None, :], (self.batch_size, 1, self.dim))
        w0 = jnp.zeros((self.batch_size, 1), self.w.dtype)
        return TokenBatch(
            jnp.concatenate([self.x, e], axis=1), jnp.concatenate([self.w, w0], axis=1), check=False
        )


def log_weights(w: Float[Array, "... n"]) -> Float[Array, "... n"]:
    """`log w` with `-inf` at `w = 0` (exact padding in a softmax), with a finite (zero)
    gradient there."""
    pos = w > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, w, 1)), -jnp.inf)


# ---------------------------------------------------------------------------------------------
# Analytic families


def _as_float(a):
    """`a` as a JAX array, keeping a floating dtype, else JAX's default float."""
    a = jnp.asarray(a)
    return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.result_type(float))


class Discrete(eqx.Module):
    r"""$\mu = \sum_k w_k \delta_{a_k}$: given atoms `(k, d)` and weights `(k,)` (uniform if None)."""

    atoms: Float[Array, "k d"]
    weights: Float[Array, " k"]

    def __init__(self, atoms, weights=None):
        atoms = _as_float(atoms)
        if atoms.ndim != 2:
            raise InputError(f"Discrete atoms have shape {atoms.shape}, expected (k, d)")
        k = atoms.shape[0]
        weights = jnp.full((k,), 1.0 / k, atoms.dtype) if weights is None else jnp.asarray(
            weights, atoms.dtype
        )
        check_shape("Discrete weights", weights, (k,), "give one weight per atom")
        check_finite("Discrete atoms", atoms)
        check_weights("Discrete weights", weights)
        self.atoms, self.weights = atoms, weights

    @property
    def dim(self) -> int:
        return self.atoms.shape[1]

    def tokens(self, key: PRNGKeyArray | None, n: int):
        """The atoms themselves, padded with zero-weight tokens up to `n` (key unused)."""
        k = self.atoms.shape[0]
        if n < k:
            raise InputError(f"Discrete sequence has {k} atoms but n={n} tokens; use n >= {k}")
        pad = n - k
        x = jnp.concatenate([self.atoms, jnp.zeros((pad, self.dim), self.atoms.dtype)])
        w = jnp.concatenate([self.weights, jnp.zeros((pad,), self.atoms.dtype)])
        return x, w

    def lse(self, z: Float[Array, "... d"]) -> Float[Array, "..."]:
        return jax.nn.logsumexp(z @ self.atoms.T + log_weights(self.weights), axis=-1)


class Gaussian(eqx.Module):
    r"""$N(m, \Sigma)$; $\mathrm{LSE}(z) = \langle m, z\rangle + \tfrac12 z^\top \Sigma z$."""

    mean: Float[Array, " d"]
    cov: Float[Array, "d d"]

    def __init__(self, mean, cov):
        mean = _as_float(mean)
        cov = jnp.asarray(cov, dtype=mean.dtype)
        if mean.ndim != 1:
            raise InputError(f"Gaussian mean has shape {mean.shape}, expected (d,)")
        d = mean.shape[0]
        check_shape("Gaussian cov", cov, (d, d), "the covariance is a d x d matrix")
        check_finite("Gaussian mean", mean)
        check_finite("Gaussian cov", cov)
        c = np.asarray(cov)
        if not np.allclose(c, c.T) or np.linalg.eigvalsh(0.5 * (c + c.T)).min() < -1e-12:
            raise InputError("Gaussian cov must be symmetric positive semi-definite")
        self.mean, self.cov = mean, cov

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def tokens(self, key: PRNGKeyArray, n: int):
        """`n` i.i.d. samples with weights `1/n`."""
        x = jax.random.multivariate_normal(key, self.mean, self.cov, (n,), method="svd")
        return x.astype(self.mean.dtype), jnp.full((n,), 1.0 / n, self.mean.dtype)

    def lse(self, z: Float[Array, "... d"]) -> Float[Array, "..."]:
        return z @ self.mean + 0.5 * jnp.einsum("...i,ij,...j->...", z, self.cov, z)


class GaussianMixture(eqx.Module):
    r"""$\sum_k \pi_k N(m_k, \Sigma_k)$; its LSE is a log-sum-exp of quadratics."""

    weights: Float[Array, " K"]
    means: Float[Array, "K d"]
    covs: Float[Array, "K d d"]

    def __init__(self, weights, means, covs):
        means = _as_float(means)
        if means.ndim != 2:
            raise InputError(f"GaussianMixture means have shape {means.shape}, expected (K, d)")
        k, d = means.shape
        weights = jnp.asarray(weights, means.dtype)
        covs = jnp.asarray(covs, means.dtype)
        check_shape("GaussianMixture weights", weights, (k,), "one weight per component")
        check_shape("GaussianMixture covs", covs, (k, d, d), "one d x d covariance per component")
        check_weights("GaussianMixture weights", weights)
        check_finite("GaussianMixture means", means)
        check_finite("GaussianMixture covs", covs)
        self.weights, self.means, self.covs = weights, means, covs

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def tokens(self, key: PRNGKeyArray, n: int):
        kc, kx = jax.random.split(key)
        comp = jax.random.choice(kc, self.weights.shape[0], (n,), p=self.weights)
        chol = jnp.linalg.cholesky(self.covs + 1e-300 * jnp.eye(self.dim, dtype=self.covs.dtype))
        eps = jax.random.normal(kx, (n, self.dim), self.means.dtype)
        x = self.means[comp] + jnp.einsum("nij,nj->ni", chol[comp], eps)
        return x, jnp.full((n,), 1.0 / n, self.means.dtype)

    def lse(self, z: Float[Array, "... d"]) -> Float[Array, "..."]:
        quad = z @ self.means.T + 0.5 * jnp.einsum("...i,kij,...j->...k", z, self.covs, z)
        return jax.nn.logsumexp(quad + jnp.log(self.weights), axis=-1)


# Taylor coefficients of φ(t) - t/2 in powers of t² (t², t⁴, ..., t¹⁴); the next term is below
# 1e-18 for |t| < 1/2.
_PHI_SERIES = (1 / 24, -1 / 2880, 1 / 181440, -1 / 9676800, 1 / 479001600,
               -4.4034917822395776e-11, 9.5589546647747706e-13)


def _log_expm1_ratio(t):
    r"""$\varphi(t) = \log((e^t - 1)/t)$, stable for all real t, with accurate derivatives.

    Uses $\varphi(t) = \max(t, 0) + \log(-\mathrm{expm1}(-|t|)) - \log|t|$ (from
    $\varphi(t) - \varphi(-t) = t$) for $|t| \ge 1/2$, and the even Taylor series of
    $\varphi(t) - t/2$ below, so that value, gradient and Hessian stay at full precision.
    """
    small = jnp.abs(t) < 0.5
    a = jnp.where(small, 1.0, jnp.abs(t))
    big = jnp.maximum(t, 0) + jnp.log(-jnp.expm1(-a)) - jnp.log(a)
    t2 = t * t
    poly = jnp.zeros_like(t)
    for c in reversed(_PHI_SERIES):
        poly = c + t2 * poly
    return jnp.where(small, t / 2 + t2 * poly, big)


class UniformBox(eqx.Module):
    r"""Uniform on $\prod_i [a_i, b_i]$; $\mathrm{LSE}(z) = \sum_i z_i a_i + \varphi(z_i (b_i - a_i))$."""

    low: Float[Array, " d"]
    high: Float[Array, " d"]

    def __init__(self, low, high):
        low = _as_float(low)
        high = jnp.asarray(high, low.dtype)
        check_shape("UniformBox high", high, low.shape, "low and high are both (d,)")
        if low.ndim != 1 or not bool(jnp.all(high > low)):
            raise InputError("UniformBox needs low, high of shape (d,) with high > low everywhere")
        self.low, self.high = low, high

    @property
    def dim(self) -> int:
        return self.low.shape[0]

    def tokens(self, key: PRNGKeyArray, n: int):
        u = jax.random.uniform(key, (n, self.dim), self.low.dtype)
        return self.low + u * (self.high - self.low), jnp.full((n,), 1.0 / n, self.low.dtype)

    def lse(self, z: Float[Array, "... d"]) -> Float[Array, "..."]:
        return jnp.sum(z * self.low + _log_expm1_ratio(z * (self.high - self.low)), axis=-1)


_BALL_NODES = 256


class UniformBall(eqx.Module):
    r"""Uniform on the ball $\{|y - c| \le r\}$.

    $\mathrm{LSE}(z) = \langle c, z\rangle + \log E[e^{r|z| u_1}]$, where $u_1$ (first coordinate of
    a uniform point of the unit ball) has density $\propto (1 - t^2)^{(d-1)/2}$. With
    $t = \sin\phi$ the expectation is $\int e^{a\sin\phi}\cos^d\phi\,d\phi / \int\cos^d\phi\,d\phi$
    over $[-\pi/2, \pi/2]$, a smooth integrand, evaluated by Gauss–Legendre quadrature
    (256 nodes: exact to rounding for $r|z| \lesssim 100$).
    """

    center: Float[Array, " d"]
    radius: Float[Array, ""]

    def __init__(self, center, radius):
        center = _as_float(center)
        radius = jnp.asarray(radius, center.dtype)
        if center.ndim != 1 or radius.ndim != 0 or not bool(radius > 0):
            raise InputError("UniformBall needs a center of shape (d,) and a scalar radius > 0")
        self.center, self.radius = center, radius

    @property
    def dim(self) -> int:
        return self.center.shape[0]

    def tokens(self, key: PRNGKeyArray, n: int):
        kd, kr = jax.random.split(key)
        g = jax.random.normal(kd, (n, self.dim), self.center.dtype)
        u = g / jnp.linalg.norm(g, axis=-1, keepdims=True)
        rad = self.radius * jax.random.uniform(kr, (n, 1), self.center.dtype) ** (1.0 / self.dim)
        return self.center + rad * u, jnp.full((n,), 1.0 / n, self.center.dtype)

    def lse(self, z: Float[Array, "... d"]) -> Float[Array, "..."]:
        nodes, weights = np.polynomial.legendre.leggauss(_BALL_NODES)
        phi = jnp.asarray(nodes * np.pi / 2, z.dtype)
        logw = jnp.asarray(np.log(weights), z.dtype) + self.dim * jnp.log(jnp.cos(phi))
        a = self.radius * jnp.linalg.norm(z, axis=-1, keepdims=True)
        log_num = jax.nn.logsumexp(logw + a * jnp.sin(phi), axis=-1)
        return z @ self.center + log_num - jax.nn.logsumexp(logw)


Family = Discrete | Gaussian | GaussianMixture | UniformBox | UniformBall


def sample_tokens(key: PRNGKeyArray, families: Sequence[Family], n: int) -> TokenBatch:
    """One sequence of `n` tokens from each family, stacked into a `TokenBatch` of `B = len(families)`.

    Continuous families give `n` i.i.d. samples with weights `1/n`; a `Discrete` family gives its
    atoms, padded with zero-weight tokens.
    """
    if len(families) == 0:
        raise InputError("sample_tokens needs at least one family")
    dims = {f.dim for f in families}
    if len(dims) != 1:
        raise InputError(f"all sequences must live in the same dimension d, got {sorted(dims)}")
    keys = jax.random.split(key, len(families))
    xs, ws = zip(*(f.tokens(k, n) for f, k in zip(families, keys)))
    return TokenBatch(jnp.stack(xs), jnp.stack(ws))


def discrete_batch(families: Sequence[Discrete]) -> TokenBatch:
    """The empirical sequences as one `TokenBatch`, padded with zero-weight tokens."""
    n = max(f.atoms.shape[0] for f in families)
    return sample_tokens(jax.random.PRNGKey(0), families, n)


def families_from_tokens(tokens: TokenBatch) -> list[Discrete]:
    """One `Discrete` measure per sequence of a `TokenBatch` (padding keeps weight 0)."""
    return [Discrete(tokens.x[i], tokens.w[i]) for i in range(tokens.batch_size)]
