r"""Risks on the output token measures, with their terminal adjoints.

A risk is $R = \frac1B \sum_{i=1}^B J_i(X^i_1)$: a per-sequence loss $J_i$ of the final token
positions $X^i_1$ `(n, d)`, averaged over the batch. Every risk is an `eqx.Module` holding its
targets, with

- `losses(x, w) -> (B,)`: the per-sequence losses $J_i$;
- `__call__(x, w) -> ()`: the risk $R$ (their mean);
- `terminal_adjoint(x, w) -> (B, n, d)`: $\lambda^i_1 = \partial J_i / \partial X^i_1$, the gradient
  of each sequence's loss with respect to its final token positions (the starting point of the
  backward adjoint ODE; positional units, see `_adjoint.py`). Closed form where there is one,
  automatic differentiation of `losses` otherwise (Sinkhorn);
- `validate(tokens)`: raise `InputError` if the targets do not fit the token batch.

Presets:

- `TokenRegression(y, readout=P)`: $J_i = \sum_k w_{ik} \tfrac12 |P X_{ik} - y_{ik}|^2$.
- `QueryRegression(y, readout=P)`: $J_i = \tfrac12 |P x^i_e - y_i|^2$ on the final position of
  the readout query token $e$ (the last token, appended with weight 0 by `TokenBatch.append_query`).
- `QueryClassification(labels, readout=P)`: cross-entropy of the logits $P x^i_e$.
- `SinkhornRisk(y, y_weights, epsilon)`: the debiased Sinkhorn divergence
  $S_\varepsilon(\mu^i_1, \nu_i)$ between the output measure and a target token measure (ott-jax).
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._errors import InputError, check_finite, check_shape, check_weights, concrete_or_none
from ._tokens import TokenBatch


class AbstractRisk(eqx.Module):
    """Base class: $R = \\frac1B\\sum_i J_i(X^i_1)$.

    Subclasses implement `losses` and `validate`."""

    @abc.abstractmethod
    def losses(self, x: Float[Array, "B n d"], w: Float[Array, "B n"]) -> Float[Array, " B"]:
        """Per-sequence losses $J_i(X^i_1)$."""

    @abc.abstractmethod
    def validate(self, tokens: TokenBatch) -> None:
        """Raise `InputError` unless the targets fit `tokens` (shapes, dtypes, query token)."""

    def __call__(self, x: Float[Array, "B n d"], w: Float[Array, "B n"]) -> Float[Array, ""]:
        return jnp.mean(self.losses(x, w))

    def metrics(self, x: Float[Array, "B n d"], w: Float[Array, "B n"]) -> dict[str, Array]:
        """Evaluation metrics of final tokens: `loss` (and more where a risk defines them)."""
        return {"loss": self(x, w)}

    def terminal_adjoint(
        self, x: Float[Array, "B n d"], w: Float[Array, "B n"]
    ) -> Float[Array, "B n d"]:
        r"""$\partial J_i / \partial X^i_1$ for every sequence `(B, n, d)` (no $1/B$ factor)."""
        return jax.grad(lambda y: jnp.sum(self.losses(y, w)))(x)


def _readout(readout, name: str):
    if readout is None:
        return None
    P = jnp.asarray(readout)
    if P.ndim != 2:
        raise InputError(f"{name} readout has shape {tuple(P.shape)}, expected (d_out, d)")
    check_finite(f"{name} readout", P)
    return P


def _check_readout(name: str, P, d_out: int, d: int) -> None:
    if P is None:
        if d_out != d:
            raise InputError(
                f"{name} targets have dimension {d_out} but tokens have d={d}; give a readout "
                f"matrix of shape ({d_out}, {d}) or targets of dimension {d}"
            )
    else:
        check_shape(f"{name} readout", P, (d_out, d),
                    "the readout maps token space R^d to target space R^d_out")


def _check_query(name: str, tokens: TokenBatch) -> None:
    w = concrete_or_none(tokens.w)
    if w is not None and (w[:, -1] != 0).any():
        raise InputError(
            f"{name} reads the last token as the readout query, but its weight is not 0; append "
            f"the query with tokens.append_query(e)"
        )


def _check_dtype(name: str, arr, tokens: TokenBatch) -> None:
    if arr is not None and arr.dtype != tokens.x.dtype:
        raise InputError(f"{name} is {arr.dtype} but tokens are {tokens.x.dtype}; cast one of them")


class TokenRegression(AbstractRisk):
    r"""Token-wise regression $J_i = \sum_k w_{ik}\, \tfrac12 |P X^i_{k}(1) - y_{ik}|^2$.

    **Fields:** `y` targets `(B, n, d_out)`; `readout` $P$ `(d_out, d)` or `None` (identity).
    Terminal adjoint: $\lambda_{ik} = w_{ik} P^\top (P X_{ik} - y_{ik})$.
    """

    y: Float[Array, "B n e"]
    readout: Float[Array, "e d"] | None = None

    def __init__(self, y, readout=None):
        y = jnp.asarray(y)
        if y.ndim != 3:
            raise InputError(
                f"token-regression targets y have shape {tuple(y.shape)}, expected (B, n, d): one "
                f"target per token"
            )
        check_finite("token-regression targets y", y)
        self.y = y
        self.readout = _readout(readout, "token-regression")

    def _project(self, x):
        return x if self.readout is None else x @ self.readout.T

    def losses(self, x, w):
        r = self._project(x) - self.y
        return 0.5 * jnp.einsum("bn,bnd,bnd->b", w, r, r)

    def terminal_adjoint(self, x, w):
        r = self._project(x) - self.y
        g = r if self.readout is None else r @ self.readout
        return w[..., None] * g

    def validate(self, tokens):
        B, n, d = tokens.x.shape
        check_shape("token-regression targets y", self.y, (B, n, None),
                    f"targets must be (B, n, d_out) = ({B}, {n}, d_out) like the tokens")
        _check_readout("token-regression", self.readout, self.y.shape[-1], d)
        _check_dtype("token-regression targets y", self.y, tokens)


class QueryRegression(AbstractRisk):
    r"""Regression on the readout query: $J_i = \tfrac12 |P x^i_e(1) - y_i|^2$.

    The query $e$ is the last token of every sequence (append it with weight 0 using
    `TokenBatch.append_query(e)`: it moves with the flow but is invisible as a key).

    **Fields:** `y` `(B, d_out)`; `readout` $P$ `(d_out, d)` or `None` (identity).
    """

    y: Float[Array, "B e"]
    readout: Float[Array, "e d"] | None = None

    def __init__(self, y, readout=None):
        y = jnp.asarray(y)
        if y.ndim != 2:
            raise InputError(
                f"query-regression targets y have shape {tuple(y.shape)}, expected (B, d_out): one "
                f"target per sequence"
            )
        check_finite("query-regression targets y", y)
        self.y = y
        self.readout = _readout(readout, "query-regression")

    def _residual(self, x):
        xe = x[:, -1]
        out = xe if self.readout is None else xe @ self.readout.T
        return out - self.y

    def losses(self, x, w):
        r = self._residual(x)
        return 0.5 * jnp.sum(r * r, axis=-1)

    def terminal_adjoint(self, x, w):
        r = self._residual(x)
        g = r if self.readout is None else r @ self.readout
        return jnp.zeros_like(x).at[:, -1].set(g)

    def validate(self, tokens):
        B, _, d = tokens.x.shape
        check_shape("query-regression targets y", self.y, (B, None),
                    f"targets must be (B, d_out) with B={B}")
        _check_readout("query-regression", self.readout, self.y.shape[-1], d)
        _check_query("query-regression", tokens)
        _check_dtype("query-regression targets y", self.y, tokens)


class QueryClassification(AbstractRisk):
    r"""Cross-entropy of the readout query's logits:
    $J_i = \log\sum_c e^{(P x^i_e)_c} - (P x^i_e)_{y_i}$.

    **Fields:** `labels` integer classes `(B,)` in `[0, C)`; `readout` $P$ `(C, d)`.
    Terminal adjoint on the query: $P^\top(\operatorname{softmax}(P x_e) - \mathbf 1_{y_i})$.
    """

    labels: Int[Array, " B"]
    readout: Float[Array, "C d"]

    def __init__(self, labels, readout):
        labels = jnp.asarray(labels)
        if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise InputError(
                f"class labels must be a 1-D integer array (B,), got shape {tuple(labels.shape)} "
                f"and dtype {labels.dtype}"
            )
        P = _readout(readout, "query-classification")
        if P is None:
            raise InputError("query classification needs a readout matrix of shape (C, d)")
        lab = concrete_or_none(labels)
        if lab is not None and lab.size and (lab.min() < 0 or lab.max() >= P.shape[0]):
            raise InputError(
                f"class labels must lie in [0, {P.shape[0]}) (the readout has C={P.shape[0]} "
                f"rows); got labels in [{lab.min()}, {lab.max()}]"
            )
        self.labels = labels
        self.readout = P

    def logits(self, x: Float[Array, "B n d"]) -> Float[Array, "B C"]:
        """The class logits $P x^i_e$ of every sequence's readout query."""
        return x[:, -1] @ self.readout.T

    def predictions(self, x: Float[Array, "B n d"]) -> Int[Array, " B"]:
        """The predicted class of every sequence (argmax of the logits)."""
        return jnp.argmax(self.logits(x), axis=-1)

    def metrics(self, x, w):
        """`loss` and `accuracy` (fraction of sequences whose predicted class is the label)."""
        return {"loss": self(x, w), "accuracy": jnp.mean(self.predictions(x) == self.labels)}

    def losses(self, x, w):
        logits = self.logits(x)
        picked = jnp.take_along_axis(logits, self.labels[:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    def terminal_adjoint(self, x, w):
        logits = self.logits(x)
        p = jax.nn.softmax(logits, axis=-1)
        p = p - jax.nn.one_hot(self.labels, logits.shape[-1], dtype=p.dtype)
        return jnp.zeros_like(x).at[:, -1].set(p @ self.readout)

    def validate(self, tokens):
        B, _, d = tokens.x.shape
        check_shape("class labels", self.labels, (B,), f"give one label per sequence (B={B})")
        check_shape("classification readout", self.readout, (None, d),
                    f"the readout is (C, d) with the tokens' d={d}")
        _check_query("query-classification", tokens)
        _check_dtype("classification readout", self.readout, tokens)


class SinkhornRisk(AbstractRisk):
    r"""Debiased Sinkhorn divergence to a target token measure per sequence:
    $J_i = S_\varepsilon(\mu^i_1, \nu_i)$, squared-Euclidean cost, computed by ott-jax
    (`PointCloud` geometry, `sinkhorn_divergence`).

    **Fields:** `y` target positions `(B, m, d)`; `y_weights` `(B, m)` (uniform if `None`);
    `epsilon` the entropic regularisation (an array: changing it does not recompile);
    `threshold`, `max_iterations` (static) the Sinkhorn stopping rule. The terminal adjoint is
    `jax.grad` of the divergence (ott's implicit differentiation); its accuracy is that of the
    Sinkhorn solve, so keep `threshold` small when gradients are compared at high precision.
    Zero-weight tokens (padding, queries) get a zero adjoint.
    """

    y: Float[Array, "B m d"]
    y_weights: Float[Array, "B m"]
    epsilon: Array = eqx.field(converter=jnp.asarray, default=0.1)
    threshold: float = eqx.field(static=True, default=1e-9)
    max_iterations: int = eqx.field(static=True, default=5000)

    def __init__(self, y, y_weights=None, epsilon=0.1, *, threshold: float = 1e-9,
                 max_iterations: int = 5000):
        y = jnp.asarray(y)
        if y.ndim != 3:
            raise InputError(
                f"Sinkhorn targets y have shape {tuple(y.shape)}, expected (B, m, d): one target "
                f"token measure per sequence"
            )
        check_finite("Sinkhorn targets y", y)
        B, m, _ = y.shape
        if y_weights is None:
            y_weights = jnp.full((B, m), 1.0 / m, y.dtype)
        y_weights = jnp.asarray(y_weights, y.dtype)
        check_shape("Sinkhorn target weights", y_weights, (B, m), "one weight per target token")
        check_weights("Sinkhorn target weights", y_weights)
        eps = concrete_or_none(epsilon)
        if eps is not None and not (np.ndim(eps) == 0 and np.isfinite(eps) and eps > 0):
            raise InputError(f"Sinkhorn epsilon must be a positive scalar, got {epsilon}")
        self.y, self.y_weights = y, y_weights
        self.epsilon = jnp.asarray(epsilon, y.dtype)
        self.threshold, self.max_iterations = threshold, max_iterations

    def losses(self, x, w):
        return _sinkhorn_losses(x, w, self.y, self.y_weights, self.epsilon, self.threshold,
                                self.max_iterations)

    def validate(self, tokens):
        B, _, d = tokens.x.shape
        check_shape("Sinkhorn targets y", self.y, (B, None, d),
                    f"targets must be (B, m, d) = ({B}, m, {d})")
        _check_dtype("Sinkhorn targets y", self.y, tokens)


@eqx.filter_jit
def _sinkhorn_losses(x, w, y, b, epsilon, threshold: float, max_iterations: int):
    """Per-sequence debiased Sinkhorn divergences (jitted: ott's loops are slow op by op)."""
    from ott.geometry import pointcloud
    from ott.tools import sinkhorn_divergence

    kwargs = {"threshold": threshold, "max_iterations": max_iterations}

    def one(xi, wi, yi, bi):
        div, _ = sinkhorn_divergence.sinkhorn_divergence(
            pointcloud.PointCloud, xi, yi, a=wi, b=bi, epsilon=epsilon, solve_kwargs=kwargs,
        )
        return div

    return jax.vmap(one)(x, w, y, b)
