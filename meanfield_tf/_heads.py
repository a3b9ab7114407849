r"""The head measure $\nu = \int \delta_s \otimes \nu_s\, ds$, held as particles.

Depth $[0, 1]$ is cut into $L$ cells $[l/L, (l+1)/L)$ with $M$ head particles each. Two
parametrisations of a head:

- **merged** (default): $\theta = (A, V)$, $A, V \in \mathbb{R}^{d\times d}$;
- **factored**: $\theta = (Q, K, V)$ with $Q, K \in \mathbb{R}^{k\times d}$ and $A = Q^\top K$.
  Same velocity field, but a different training metric (gradients live on $(Q, K)$, not $A$).

Two depth interpolations:

- **piecewise** (default): arrays have $L$ entries along depth; $\nu_s$ is the empirical measure
  of cell $\lfloor sL \rfloor$. Explicit Euler with one step per cell is exactly the finite
  transformer $X^{l+1} = X^l + \frac{1}{L}\frac{1}{M}\sum_m a_{\theta_{l,m}}[\mu^l](X^l)$.
- **linear**: arrays have $L + 1$ nodes; particle $m$ moves linearly from node $l$ to node $l+1$
  across cell $l$ (a continuous-in-depth parameter path).

Optionally the same pytree holds a second particle family, the MLP units $\theta' = (u, w, b)$
(`_units.py`): `U`, `W` `(N, M', d)` and `b` `(N, M')`, on the same depth cells and
interpolation, so flows, gradients, optimisers and checkpoints move both families together.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._errors import InputError, check_finite, check_real
from ._units import UNIT_KEYS

_INTERPOLATIONS = ("piecewise", "linear")


class HeadMeasure(eqx.Module):
    """Head particles for `L` depth cells × `M` heads.

    **Fields:**

    - `params`: a dict of arrays, each of shape `(N, M, ...)` with `N = L` (piecewise) or
      `N = L + 1` (linear): `{"A": (N,M,d,d), "V": (N,M,d,d)}` (merged) or
      `{"Q": (N,M,k,d), "K": (N,M,k,d), "V": (N,M,d,d)}` (factored); optionally MLP units
      `{"U": (N,M',d), "W": (N,M',d), "b": (N,M')}` as well.
    - `interpolation`: `"piecewise"` or `"linear"` (static).

    Build one with `HeadMeasure(A=..., V=...)` or `HeadMeasure(Q=..., K=..., V=...)`, adding
    `U=..., W=..., b=...` for MLP units (all three or none).
    """

    params: dict[str, Array]
    interpolation: str = eqx.field(static=True)

    def __init__(self, *, A=None, V=None, Q=None, K=None, U=None, W=None, b=None,
                 interpolation: str = "piecewise", check: bool = True):
        if interpolation not in _INTERPOLATIONS:
            raise InputError(
                f"unknown depth interpolation {interpolation!r}; use one of {_INTERPOLATIONS}"
            )
        if V is None:
            raise InputError("a head measure needs value matrices V of shape (L, M, d, d)")
        if A is not None and (Q is not None or K is not None):
            raise InputError("give either A (merged heads) or Q and K (factored heads), not both")
        if A is None and (Q is None or K is None):
            raise InputError("give A (merged heads) or both Q and K (factored heads)")
        units = {"U": U, "W": W, "b": b}
        given = [k for k, v in units.items() if v is not None]
        if given and len(given) != 3:
            raise InputError(f"MLP units need all of U, W and b; got only {', '.join(given)}")
        if check:
            for name, arr in (("A", A), ("V", V), ("Q", Q), ("K", K), ("U", U), ("W", W), ("b", b)):
                if arr is not None:
                    check_real(f"heads {name}", arr)
        V = jnp.asarray(V)
        params = {"V": V}
        if A is not None:
            params["A"] = jnp.asarray(A, V.dtype)
        else:
            params["Q"] = jnp.asarray(Q, V.dtype)
            params["K"] = jnp.asarray(K, V.dtype)
        if given:
            params.update({k: jnp.asarray(v, V.dtype) for k, v in units.items()})
        if check:
            _validate(params)
        self.params = params
        self.interpolation = interpolation

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def factored(self) -> bool:
        return "Q" in self.params

    @property
    def num_layers(self) -> int:
        """L, the number of depth cells."""
        n = self.params["V"].shape[0]
        return n - 1 if self.interpolation == "linear" else n

    @property
    def num_heads(self) -> int:
        return self.params["V"].shape[1]

    @property
    def has_units(self) -> bool:
        """Whether the measure holds MLP units besides the heads."""
        return "U" in self.params

    @property
    def num_units(self) -> int:
        """M', the number of MLP units per depth cell (0 without units)."""
        return self.params["U"].shape[1] if self.has_units else 0

    def particle_counts(self) -> dict[str, int]:
        """Per parameter key, the particles per cell of its family: `M` (heads) or `M'` (units)."""
        return {k: self.num_units if k in UNIT_KEYS else self.num_heads for k in self.params}

    def mean_field_scale(self) -> dict[str, int]:
        """Per parameter key, the factor `L M` (heads) or `L M'` (units) that turns `∂R/∂θ` into
        the mean-field gradient of that particle family."""
        return {k: self.num_layers * m for k, m in self.particle_counts().items()}

    def with_units(self, U, W, b) -> "HeadMeasure":
        """The same heads with MLP units `U`, `W` `(N, M', d)`, `b` `(N, M')` (replacing any)."""
        heads = {k: v for k, v in self.params.items() if k not in UNIT_KEYS}
        return HeadMeasure(**heads, U=U, W=W, b=b, interpolation=self.interpolation)

    def without_units(self) -> "HeadMeasure":
        """The attention heads alone."""
        heads = {k: v for k, v in self.params.items() if k not in UNIT_KEYS}
        return HeadMeasure(**heads, interpolation=self.interpolation, check=False)

    @property
    def dim(self) -> int:
        return self.params["V"].shape[-1]

    @property
    def dtype(self):
        return self.params["V"].dtype

    @property
    def A(self) -> Float[Array, "N M d d"]:
        """Merged query-key matrices (computed as QᵀK for factored heads)."""
        return merged_query_key(self.params)

    @property
    def V(self) -> Float[Array, "N M d d"]:
        return self.params["V"]

    def astype(self, dtype) -> "HeadMeasure":
        return eqx.tree_at(lambda h: h.params, self,
                           {k: v.astype(dtype) for k, v in self.params.items()})

    def cells(self) -> tuple[dict[str, Array], dict[str, Array]]:
        """Parameters at the left and right end of every cell, each leaf of shape `(L, M, ...)`.

        Piecewise: both ends are the cell's particles. Linear: nodes `l` and `l + 1`.
        """
        if self.interpolation == "linear":
            return ({k: v[:-1] for k, v in self.params.items()},
                    {k: v[1:] for k, v in self.params.items()})
        return self.params, self.params

    def at_depth(self, s) -> dict[str, Array]:
        """Particles of ν_s at a depth `s ∈ [0, 1]`, each leaf of shape `(M, ...)`."""
        L = self.num_layers
        s = jnp.asarray(s, self.dtype)
        cell = jnp.clip(jnp.floor(s * L).astype(jnp.int32), 0, L - 1)
        left, right = self.cells()
        u = s * L - cell
        return interpolate_cell(jax.tree.map(lambda a: a[cell], left),
                                jax.tree.map(lambda a: a[cell], right), u)


def merged_query_key(params: dict[str, Array]) -> Array:
    """`A` from a parameter dict: itself (merged) or `Qᵀ K` (factored), over leading axes."""
    if "A" in params:
        return params["A"]
    return jnp.einsum("...ki,...kj->...ij", params["Q"], params["K"])


def interpolate_cell(left: dict[str, Array], right: dict[str, Array], u) -> dict[str, Array]:
    """`(1 - u) θ_left + u θ_right`, written so that `left is right` returns `left` exactly."""
    return jax.tree.map(lambda a, b: a + u.astype(a.dtype) * (b - a), left, right)


def _validate(params: dict[str, Array]) -> None:
    V = params["V"]
    if V.ndim != 4 or V.shape[-1] != V.shape[-2]:
        raise InputError(f"heads V has shape {tuple(V.shape)}, expected (L, M, d, d)")
    n, m, d, _ = V.shape
    if d < 1:
        raise InputError(f"heads V has shape {tuple(V.shape)}: the token dimension d must be >= 1")
    if n < 1 or m < 1:
        raise InputError(f"heads V has shape {tuple(V.shape)}: need at least one layer and one head")
    if "A" in params:
        if params["A"].shape != V.shape:
            raise InputError(
                f"heads A has shape {tuple(params['A'].shape)} but V has {tuple(V.shape)}; "
                f"A and V must both be (L, M, d, d)"
            )
    else:
        q, k = params["Q"], params["K"]
        if q.ndim != 4 or q.shape != k.shape or q.shape[:2] != (n, m) or q.shape[-1] != d:
            raise InputError(
                f"factored heads need Q and K of shape (L, M, k, d) = (.., .., k, {d}) matching V "
                f"{tuple(V.shape)}; got Q {tuple(q.shape)}, K {tuple(k.shape)}"
            )
    if "U" in params:
        _validate_units(params, n, d)
    for name, arr in params.items():
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise InputError(f"heads {name} must be floating point, got {arr.dtype}")
        check_finite(f"heads {name}", arr)


def _validate_units(params: dict[str, Array], n: int, d: int) -> None:
    U, W, b = params["U"], params["W"], params["b"]
    if U.ndim != 3 or U.shape[0] != n or U.shape[1] < 1 or U.shape[2] != d:
        raise InputError(f"units U has shape {tuple(U.shape)}, expected (N, M', d) = "
                         f"({n}, M', {d}) with the heads' depth cells and dimension")
    if W.shape != U.shape:
        raise InputError(f"units W has shape {tuple(W.shape)} but U has {tuple(U.shape)}; "
                         f"U and W must both be (N, M', d)")
    if b.shape != U.shape[:2]:
        raise InputError(f"units b has shape {tuple(b.shape)}, expected (N, M') = "
                         f"{tuple(U.shape[:2])}")


# ---------------------------------------------------------------------------------------------
# Initialisations


def _cells(num_layers: int, interpolation: str) -> int:
    if num_layers < 1:
        raise InputError(f"num_layers must be >= 1, got {num_layers}")
    return num_layers + 1 if interpolation == "linear" else num_layers


def gaussian_heads(
    key: PRNGKeyArray,
    num_layers: int,
    num_heads: int,
    dim: int,
    *,
    scale_A: float = 1.0,
    scale_V: float = 1.0,
    mean_A: float = 0.0,
    mean_V: float = 0.0,
    rank: int | None = None,
    interpolation: str = "piecewise",
    dtype=None,
) -> HeadMeasure:
    r"""I.i.d. Gaussian particles: $A = a I + G_A$, $V = b I + G_V$ with entries of $G$ i.i.d.
    $N(0, \sigma^2 / d)$ ($a$ = `mean_A`, $b$ = `mean_V`).

    With this scaling a random matrix has operator norm $O(\sigma)$ whatever $d$. Zero-mean heads
    average out: the velocity of $M$ i.i.d. heads is $O(M^{-1/2})$, so visible dynamics at large
    $M$ need a non-zero mean (e.g. `mean_A = β`, `mean_V = 1`: the clustering dynamics of
    self-attention). For factored heads
    (`rank=k`), Q and K entries have variance $\sigma_A / \sqrt{k d}$, so that $A = Q^\top K$
    has the same entry variance $\sigma_A^2 / d$ as in the merged case.
    """
    dtype = dtype or jnp.result_type(float)
    n = _cells(num_layers, interpolation)
    kA, kV, kK = jax.random.split(key, 3)
    d = dim
    eye = jnp.eye(d, dtype=dtype)
    V = mean_V * eye + scale_V / jnp.sqrt(d) * jax.random.normal(kV, (n, num_heads, d, d), dtype)
    if rank is None:
        A = mean_A * eye + scale_A / jnp.sqrt(d) * jax.random.normal(kA, (n, num_heads, d, d), dtype)
        return HeadMeasure(A=A, V=V, interpolation=interpolation)
    if mean_A:
        raise InputError("mean_A is not available for factored heads (A = QᵀK); use rank=None")
    s = jnp.sqrt(scale_A / jnp.sqrt(d)) / rank**0.25
    Q = s * jax.random.normal(kA, (n, num_heads, rank, d), dtype)
    K = s * jax.random.normal(kK, (n, num_heads, rank, d), dtype)
    return HeadMeasure(Q=Q, K=K, V=V, interpolation=interpolation)


def symmetric_heads(
    key: PRNGKeyArray,
    num_layers: int,
    num_heads: int,
    dim: int,
    *,
    scale_A: float = 1.0,
    scale_V: float = 1.0,
    mean_A: float = 0.0,
    rank: int | None = None,
    interpolation: str = "piecewise",
    dtype=None,
) -> HeadMeasure:
    r"""The symmetric zero-velocity initialisation: heads come in pairs $(A, V)$ and $(A, -V)$.

    Head $m + M/2$ mirrors head $m$, so the head-averaged velocity is zero and the initial flow is
    the identity, while the NTK is non-degenerate. `num_heads` must be even.
    """
    if num_heads % 2:
        raise InputError(f"symmetric_heads needs an even number of heads, got {num_heads}")
    half = gaussian_heads(key, num_layers, num_heads // 2, dim, scale_A=scale_A, scale_V=scale_V,
                          mean_A=mean_A, rank=rank, interpolation=interpolation, dtype=dtype)
    p = half.params
    doubled = {k: jnp.concatenate([v, -v if k == "V" else v], axis=1) for k, v in p.items()}
    return HeadMeasure(**doubled, interpolation=interpolation)
