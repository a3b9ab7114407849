r"""The neural tangent kernel (NTK) of the mean-field transformer.

For outputs $Y = (Y_1, \dots, Y_B)$ of the finite model with $L$ layers of $M$ heads
$\theta_{l,m}$, the NTK **in mean-field units** is the Gram matrix

$$K_{ij} = L M \sum_{l,m} \frac{\partial Y_i}{\partial \theta_{l,m}}
\frac{\partial Y_j}{\partial \theta_{l,m}}^{\top}
\;\xrightarrow[L, M \to \infty]{}\;
\int_0^1\!\!\int J_i(s,\theta) J_j(s,\theta)^\top d\nu_s(\theta)\, ds,
\qquad J = \nabla_\theta \frac{\delta Y}{\delta \nu}.$$

The factor $LM$ undoes the $1/(LM)$ that every particle carries in the finite model, so that $K$
has a limit as $L, M \to \infty$ and the training dynamics read $dY/dt = -K \nabla_Y J$ under the
mean-field gradient flow (gradient $g_{l,m} = L M\, \partial R / \partial \theta_{l,m}$).

Two outputs:

- `ReadoutQuery(e)`: a zero-weight query token $e$ is appended to every sequence
  (`TokenBatch.append_query`); $Y_i \in \mathbb{R}^d$ is its final position ($B d$ outputs).
  This is the output the log-sum-exp injectivity criterion governs (see `_injectivity.py`).
- `QueryOutputs(P)`: the final position of the query a batch already holds (its last token),
  projected by $P$ ($B d_{out}$ outputs): the prediction of the readout-query risks.
- `TokenOutputs()`: every final token, $Y_i \in \mathbb{R}^{n \times d}$ ($B n d$ outputs).
  Its NTK involves each sequence's features at its *own* tokens; the LSE criterion does not
  govern it.

The Jacobian is taken with `jax.jacrev` through `meanfield_tf.flow` (explicit Euler, one step per
layer by default: the finite transformer). The Gram is split by parameter block
(`"A"`/`"V"`, or `"Q"`/`"K"`/`"V"` for factored heads) and summed into `"full"`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._errors import InputError
from ._flow import check_compatible, flow
from ._heads import HeadMeasure
from ._solvers import DepthSolver
from ._tokens import TokenBatch


class ReadoutQuery(eqx.Module):
    """Output = final position of a readout query token `e` `(d,)`, appended with weight 0.

    The query moves with the flow but is invisible as a key: the sequences' measures are
    unchanged. Outputs have shape `(B, d)`.
    """

    e: Float[Array, " d"]

    def __init__(self, e):
        e = jnp.asarray(e)
        if e.ndim != 1:
            raise InputError(f"the readout query e has shape {tuple(e.shape)}, expected (d,)")
        self.e = e

    def prepare(self, tokens: TokenBatch) -> TokenBatch:
        return tokens.append_query(self.e)

    def select(self, x: Float[Array, "B n d"]) -> Float[Array, "B d"]:
        return x[:, -1, :]


class TokenOutputs(eqx.Module):
    """Output = every final token (token-wise regression), shape `(B, n, d)`."""

    def prepare(self, tokens: TokenBatch) -> TokenBatch:
        return tokens

    def select(self, x: Float[Array, "B n d"]) -> Float[Array, "B n d"]:
        return x


class QueryOutputs(eqx.Module):
    """Output = final position of the query token a batch already holds (its last token, weight
    0, e.g. a training batch of a readout-query task), projected by `readout` $P$ `(d_out, d)`
    (`None`: the identity), shape `(B, d_out)`.

    Unlike `ReadoutQuery` every sequence may have its own query (in-context regression appends
    $(x_q, 0)$): $Y_i = P x^i_e(1)$ is the prediction `QueryRegression(y, readout=P)` scores.
    """

    readout: Float[Array, "e d"] | None = None

    def prepare(self, tokens: TokenBatch) -> TokenBatch:
        return tokens

    def select(self, x: Float[Array, "B n d"]) -> Float[Array, "B e"]:
        xe = x[:, -1, :]
        return xe if self.readout is None else xe @ self.readout.T


Output = ReadoutQuery | TokenOutputs | QueryOutputs


def predicted_slope(lambda_min, num_sequences: int):
    r"""The asymptotic slope of $\log R$ against training time predicted by the NTK:
    $-2\lambda_{\min}(K)/N$.

    For the readout-query risk $R = \frac1N\sum_i \tfrac12|Y_i - Y^*_i|^2$ under the mean-field
    gradient flow, $\nabla_Y R = r/N$ and $dr/dt = -K r/N$ (`K` in mean-field units, as
    `ntk_blocks` returns it), so $dR/dt = -r^\top K r/N^2 \le -2\lambda_{\min} R/N$: the loss
    stays below $R(t_0)\, e^{-2\lambda_{\min}(t - t_0)/N}$ while $\lambda_{\min}(K_{\nu_t})$ stays
    above $\lambda_{\min}$, and decays at that rate once the slowest mode dominates (lazy regime).
    """
    if num_sequences < 1:
        raise InputError(f"num_sequences must be >= 1, got {num_sequences}")
    return -2 * lambda_min / num_sequences


class NTKSpectrum(eqx.Module):
    """An NTK Gram matrix and its spectrum.

    **Fields:**

    - `gram`: $K$, shape `(P, P)` with `P` the number of scalar outputs (`B d` for the readout
      query, `B n d` for token outputs), in the order of `output.select(...)` flattened.
    - `eigenvalues`: the eigenvalues of $K$ in decreasing order, `(P,)`, computed as
      $L M \\sigma_k^2$ from the singular values $\\sigma_k$ of the Jacobian (accurate down to
      rounding relative to $\\lambda_{\\max}$, unlike an eigensolver on $K$ whose small
      eigenvalues are only accurate to $\\varepsilon \\lambda_{\\max}$ in absolute terms).
    """

    gram: Float[Array, "P P"]
    eigenvalues: Float[Array, " P"]

    @property
    def lambda_max(self) -> Array:
        return self.eigenvalues[0]

    @property
    def lambda_min(self) -> Array:
        return self.eigenvalues[-1]

    @property
    def condition(self) -> Array:
        """$\\lambda_{\\max} / \\lambda_{\\min}$ (inf when $K$ is singular)."""
        return self.lambda_max / self.lambda_min


def ntk_jacobian(
    heads: HeadMeasure,
    tokens: TokenBatch,
    *,
    output: Output,
    solver: DepthSolver = DepthSolver(),
) -> dict[str, Array]:
    """$\\partial Y / \\partial \\theta$ for every parameter block of `heads`.

    **Returns:** a dict with the keys of `heads.params`; entry `k` has shape
    `output_shape + heads.params[k].shape`, e.g. `(B, d, L, M, d, d)` for the readout query.
    """
    if isinstance(output, ReadoutQuery) and output.e.shape != (tokens.dim,):
        raise InputError(
            f"the readout query e has shape {tuple(output.e.shape)} but tokens live in "
            f"d={tokens.dim}; give e of shape ({tokens.dim},)"
        )
    if isinstance(output, QueryOutputs):
        if float(np.asarray(tokens.w)[:, -1].max()) != 0.0:
            raise InputError("QueryOutputs needs a batch whose last token is a query of weight 0 "
                             "(tokens.append_query(e)); use ReadoutQuery(e) to append one")
        if output.readout is not None and (output.readout.ndim != 2
                                           or output.readout.shape[1] != tokens.dim):
            raise InputError(f"the readout P has shape {tuple(output.readout.shape)}, expected "
                             f"(d_out, {tokens.dim})")
    check_compatible(heads, tokens)
    return _jacobian(heads, tokens, output, solver)


@eqx.filter_jit
def _jacobian(heads, tokens, output, solver):
    prepared = output.prepare(tokens)

    def outputs(params):
        h = eqx.tree_at(lambda hh: hh.params, heads, params)
        sol = flow(h, prepared, solver)
        return output.select(sol.x)

    return jax.jacrev(outputs)(heads.params)


def _flat(jac: Array, num_outputs: int) -> Array:
    return jac.reshape(num_outputs, -1)


def spectrum_from_jacobian(jac: Float[Array, "P F"], scale) -> NTKSpectrum:
    """The Gram $K = $ `scale` $\\cdot J J^\\top$ and its eigenvalues from the SVD of $J$."""
    jac = jnp.asarray(jac)
    p, f = jac.shape
    if f > p:
        # Wide J (many more parameters than outputs): J^T = Q R (thin QR, memory O(F P)) has the
        # singular values of R (P, P). A direct SVD of J makes the CPU's SVD work on F-sized
        # square buffers (34 GB at F = 131072); the QR is as backward stable, so the smallest
        # eigenvalues keep their absolute accuracy (the Gram J J^T would square their error).
        sv = jnp.linalg.svd(jnp.linalg.qr(jac.T, mode="r"), compute_uv=False)
    else:
        sv = jnp.linalg.svd(jac, compute_uv=False)
    if f < p:
        sv = jnp.concatenate([sv, jnp.zeros((p - f,), sv.dtype)])
    return NTKSpectrum(gram=scale * jac @ jac.T, eigenvalues=scale * sv**2)


def ntk_blocks(
    heads: HeadMeasure,
    tokens: TokenBatch,
    *,
    output: Output,
    solver: DepthSolver = DepthSolver(),
) -> dict[str, NTKSpectrum]:
    r"""The NTK Gram matrix by parameter block, in mean-field units.

    $K^{b}_{ij} = L M \sum_{l,m} \partial_{\theta^b_{l,m}} Y_i\, \partial_{\theta^b_{l,m}} Y_j^\top$
    for each block $b$ of `heads.params` (`"A"`, `"V"`, or `"Q"`, `"K"`, `"V"`), and
    $K^{\mathrm{full}} = \sum_b K^b$.

    **Arguments:** `heads`, `tokens` `(B, n, d)`, `output` (`ReadoutQuery(e)`,
    `QueryOutputs(P)` or `TokenOutputs()`), and the `DepthSolver` of the forward pass (default: the finite
    transformer).

    **Returns:** a dict `{block: NTKSpectrum, ..., "full": NTKSpectrum}`; each Gram is
    `(P, P)` with `P = B d` (readout query) or `B n d` (token outputs).

    The factor is `heads.num_layers * heads.num_heads` for both depth interpolations (with
    `"linear"` heads the `L + 1` nodes are the parameters, each shared by two cells); MLP units
    (blocks `"U"`, `"W"`, `"b"`) get `L M'`, the mean-field factor of their own family.
    """
    jac = ntk_jacobian(heads, tokens, output=output, solver=solver)
    num_out = int(np.prod(output.select(output.prepare(tokens).x).shape))
    scale = heads.mean_field_scale()
    flats = {k: _flat(v, num_out) for k, v in jac.items()}
    out = {k: spectrum_from_jacobian(v, scale[k]) for k, v in flats.items()}
    full = jnp.concatenate([np.sqrt(scale[k]) * v for k, v in flats.items()], axis=1)
    out["full"] = spectrum_from_jacobian(full, 1)
    return out


def ntk_gram(
    heads: HeadMeasure,
    tokens: TokenBatch,
    *,
    output: Output,
    block: str = "full",
    solver: DepthSolver = DepthSolver(),
) -> NTKSpectrum:
    """One block of `ntk_blocks`: `block` is a key of `heads.params` or `"full"`."""
    names = (*heads.params, "full")
    if block not in names:
        raise InputError(f"unknown NTK block {block!r}; choose one of {list(names)}")
    return ntk_blocks(heads, tokens, output=output, solver=solver)[block]
