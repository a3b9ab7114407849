r"""Closed forms of the adjoint dynamics and of the gradient field $\nabla_\theta G(s, \theta)$.

For one sequence $\mu = \sum_j w_j \delta_{x_j}$ and one head $\theta = (A, V)$, write
$z = A^\top x$ for a query $x$, $\pi_z$ the tilted (softmax) measure
$\pi_z(x_j) = w_j e^{\langle z, x_j\rangle} / \sum_i w_i e^{\langle z, x_i\rangle}$, $m(z)$ its mean and
$C(z)$ its covariance, so that $a_\theta[\mu](x) = V m(z)$. Then 

$$D_x a = V C(z) A^\top, \qquad
  \partial a(x_{k'}) / \partial x_k = \pi_{z_{k'}}(x_k)\, V \big[ I + (x_k - m(z_{k'}))\, z_{k'}^\top \big]
  = w_k\, D_\mu a(x_{k'}, x_k),$$

$$\nabla_V \big\langle \lambda, a_\theta(x) \big\rangle = \lambda\, m(z)^\top, \qquad
  \nabla_A \big\langle \lambda, a_\theta(x) \big\rangle = x\, \big(C(z) V^\top \lambda\big)^\top .$$

**Positional adjoint.** We carry the adjoint as $\lambda_k = \partial J / \partial X_k$, the gradient
of the sequence loss with respect to token positions. For a token of weight $w_k > 0$ this is
$w_k p(x_k)$ with $p$ the paper's adjoint density (w.r.t. $\mu_0$); the positional form also covers
zero-weight tokens (the readout query), whose density would be infinite. In these units the
paper's backward ODE reads

$$-\frac{d\lambda_k}{ds} = \underbrace{D_x v(X_k)^\top \lambda_k}_{\text{local}}
  + \underbrace{\sum_{k'} \frac{\partial v(X_{k'})}{\partial X_k}^{\!\top} \lambda_{k'}}_{\text{non-local}},
  \qquad v = \frac1M \sum_m a_{\theta_m},$$

and the gradient field is

$$\nabla_\theta G(s, \theta) = \frac1B \sum_{i=1}^B \sum_k \nabla_\theta a_\theta[\mu^i_s](X^i_{s,k})^\top
  \lambda^i_{s,k},$$

i.e. $\nabla_V G$ = the (token-weighted, batch-averaged) mean of $p\, m(z)^\top$ and $\nabla_A G$ the
mean of $X (C(z) V^\top p)^\top$.

**Implementation.** With $u_k = V^\top \lambda_k$, $P_{k'k} = \pi_{z_{k'}}(x_k)$ (an `n × n` matrix per
head), $S_{k'k} = \langle u_{k'}, x_k\rangle$, $c_{k'} = \langle m(z_{k'}), u_{k'}\rangle$ and
$\Gamma = P \circ (S - c\,\mathbf 1^\top)$:

- $C(z_k) u_k = (\Gamma X)_k$, so the local term is $A (\Gamma X)_k$ and $\nabla_A = X^\top \Gamma X$;
- the non-local term is $(\Gamma^\top Z + P^\top U)_k$ with $Z$ the rows $z_{k'}$.

Everything is `O(M n^2 d)` per sequence, like the dense forward kernel. Nothing here uses
automatic differentiation: `tests/test_gradients.py` checks these closed forms against `jax.vjp`
of the dense kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._tokens import log_weights
from ._heads import merged_query_key


def _head_statistics(x, w, A):
    """Per head: queries `Z = A^T x` `(M,n,d)`, softmax `P` `(M,n,n)`, tilted means `(M,n,d)`."""
    Z = jnp.einsum("nd,mde->mne", x, A)
    scores = jnp.einsum("mne,ke->mnk", Z, x) + log_weights(w)
    P = jax.nn.softmax(scores, axis=-1)
    mean = jnp.einsum("mnk,kd->mnd", P, x)
    return Z, P, mean


def _gamma(x, P, mean, U):
    """`Γ = P ∘ (S − c 1ᵀ)` with `S_{k'k} = u_{k'}·x_k`, `c_{k'} = m_{k'}·u_{k'}`."""
    S = jnp.einsum("mne,ke->mnk", U, x)
    c = jnp.einsum("mnd,mnd->mn", mean, U)
    return P * (S - c[..., None])


def _sequence_terms(x, w, lam, A, V, nonlocal_term: bool):
    """Adjoint velocity `(n, d)` (head-averaged) and per-head gradients `(M, d, d)` x 2, sharing
    the softmax statistics."""
    Z, P, mean = _head_statistics(x, w, A)
    U = jnp.einsum("nd,mde->mne", lam, V)  # u_k = V^T λ_k
    G = _gamma(x, P, mean, U)
    GX = jnp.einsum("mnk,kd->mnd", G, x)  # C(z_k) u_k
    adj = jnp.einsum("mde,mne->mnd", A, GX)  # local: A C(z) V^T λ
    if nonlocal_term:
        adj = adj + jnp.einsum("mkn,mke->mne", G, Z) + jnp.einsum("mkn,mke->mne", P, U)
    grad_A = jnp.einsum("nd,mne->mde", x, GX)  # Σ_k x_k (C(z_k) V^T λ_k)^T
    grad_V = jnp.einsum("nd,mne->mde", lam, mean)  # Σ_k λ_k m(z_k)^T
    return adj.mean(axis=0), grad_A, grad_V


def _sequence_adjoint_velocity(x, w, lam, A, V, nonlocal_term: bool):
    return _sequence_terms(x, w, lam, A, V, nonlocal_term)[0]


def _sequence_gradient(x, w, lam, A, V):
    return _sequence_terms(x, w, lam, A, V, False)[1:]


def _chain_rule(params, gA, gV):
    if "A" in params:
        return {"A": gA, "V": gV}
    return {
        "Q": jnp.einsum("...ki,...ji->...kj", params["K"], gA),
        "K": jnp.einsum("...ki,...ij->...kj", params["Q"], gA),
        "V": gV,
    }


def adjoint_and_gradient(states, weights, adjoints, params, *, nonlocal_term: bool = True):
    """`(adjoint_velocity(...), gradient_field(...))` at the same heads, computing the softmax
    statistics once (what the backward sweeps use)."""
    A = merged_query_key(params)
    adj, gA, gV = jax.vmap(_sequence_terms, in_axes=(0, 0, 0, None, None, None))(
        states, weights, adjoints, A, params["V"], nonlocal_term
    )
    return adj, _chain_rule(params, gA.mean(axis=0), gV.mean(axis=0))


def adjoint_velocity(
    states: Float[Array, "B n d"],
    weights: Float[Array, "B n"],
    adjoints: Float[Array, "B n d"],
    params: dict[str, Array],
    *,
    nonlocal_term: bool = True,
) -> Float[Array, "B n d"]:
    r"""$(\partial v / \partial X)^\top \lambda$ for every sequence: the right-hand side of the
    backward ODE $-d\lambda/ds = (\partial v/\partial X)^\top \lambda$, in closed form.

    **Arguments:**

    - `states`: token positions $X_s$, `(B, n, d)`; `weights`: token weights `(B, n)`.
    - `adjoints`: positional adjoints $\lambda_s = \partial J_i / \partial X_s$, `(B, n, d)`.
    - `params`: the `M` heads of $\nu_s$: `{"A", "V"}` each `(M, d, d)` or `{"Q", "K", "V"}`.
    - `nonlocal_term`: keep the non-local (key/value) term. `False` exists only to demonstrate
      that dropping it gives wrong gradients; never use it for training.

    **Returns:** `(B, n, d)`: local term $D_x v^\top \lambda$ plus (unless disabled) the non-local
    term $\sum_{k'} (\partial v(X_{k'})/\partial X_k)^\top \lambda_{k'}$, head-averaged ($1/M$).
    """
    A = merged_query_key(params)
    V = params["V"]
    return jax.vmap(_sequence_adjoint_velocity, in_axes=(0, 0, 0, None, None, None))(
        states, weights, adjoints, A, V, nonlocal_term
    )


def gradient_field(
    states: Float[Array, "B n d"],
    weights: Float[Array, "B n"],
    adjoints: Float[Array, "B n d"],
    params: dict[str, Array],
) -> dict[str, Array]:
    r"""The gradient field $\nabla_\theta G(s, \theta)$ at arbitrary heads $\theta$, in closed form.

    $$\nabla_\theta G(s,\theta) = \frac1B \sum_i \sum_k
      \nabla_\theta a_\theta[\mu^i_s](X^i_{s,k})^\top \lambda^i_{s,k}$$

    with $\mu^i_s = \sum_k w_{ik} \delta_{X^i_{s,k}}$. The heads need not be particles of the
    head measure: this evaluates the first variation's gradient anywhere in parameter space.

    **Arguments:**

    - `states`, `weights`, `adjoints`: as in `adjoint_velocity` (the states and adjoints at
      depth $s$; for the finite transformer, layer `l` pairs `states[l]` with `adjoints[l + 1]`,
      see `AdjointSolution`).
    - `params`: heads at which to evaluate, `{"A": (M,d,d), "V": (M,d,d)}` or factored
      `{"Q": (M,k,d), "K": (M,k,d), "V": (M,d,d)}`.

    **Returns:** a dict with the same keys and shapes as `params`. Factored heads get the chain
    rule through $A = Q^\top K$: $\nabla_Q = K (\nabla_A)^\top$, $\nabla_K = Q \nabla_A$.
    """
    A = merged_query_key(params)
    V = params["V"]
    gA, gV = jax.vmap(_sequence_gradient, in_axes=(0, 0, 0, None, None))(
        states, weights, adjoints, A, V
    )
    return _chain_rule(params, gA.mean(axis=0), gV.mean(axis=0))
