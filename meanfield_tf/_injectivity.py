r"""A numerical certificate of the log-sum-exp injectivity criterion of the attention NTK.

**The criterion.** For $B$ sequences $\mu^1, \dots, \mu^B$ let
$\mathrm{LSE}_i(z) = \log \int e^{\langle z, y\rangle} d\mu^i(y)$. The readout-query NTK of the
mean-field transformer at the symmetric zero-velocity initialisation is injective on its query-key
block iff the functions $\mathrm{LSE}_1, \dots, \mathrm{LSE}_B$ are linearly independent
**modulo affine functions**, and on its value block iff they are independent **modulo constants**.

**Why (readout query, zero velocity).** With heads in pairs $(A, V)$, $(A, -V)$
(`symmetric_heads`) the velocity $v[\nu, \mu]$ vanishes identically in $x$ and $\mu$, so the flow
is the identity and so are its derivatives: a perturbation of one particle $\theta_{l,m}$ moves
the query $e$ of sequence $i$ by exactly $\frac{1}{LM}\partial_\theta a_\theta[\mu^i](e)$ to first
order, with $a_\theta[\mu](e) = V\nabla\mathrm{LSE}_\mu(z)$, $z = A^\top e$. Hence, with
$m_i = \nabla \mathrm{LSE}_i$ and $H_i = \nabla^2 \mathrm{LSE}_i$ (the tilted covariance
$\mathrm{Cov}_{\pi_z}(y)$),

$$K^V_{ij} = \mathbb{E}_\theta\big[\langle m_i(z), m_j(z)\rangle\big]\, I_d,\qquad
K^A_{ij} = |e|^2\, \mathbb{E}_\theta\big[V H_i(z) H_j(z) V^\top\big].$$

- $c^\top K^V c = 0$ for $c \in (\mathbb{R}^d)^B$ iff $\sum_i c_i m_i(z) \equiv 0$, i.e. (for
  $c_i = \gamma_i u$) $\sum_i \gamma_i \mathrm{LSE}_i$ is **constant**.
- $K^A$ is singular iff some $\gamma \ne 0$ has $\sum_i \gamma_i H_i \equiv 0$ (because $V$ ranges
  over all matrices independently of $A$), i.e. $\sum_i \gamma_i \mathrm{LSE}_i$ is **affine**.
- $K^{\mathrm{full}} = K^A + K^V$ has null space $\ker K^A \cap \ker K^V = \ker K^V$: the full
  readout-query NTK is injective iff the LSEs are independent **modulo constants**.

In all three the null space is $N \otimes \mathbb{R}^d$ with $N \subset \mathbb{R}^B$ the space of
dependences $\gamma$, so the certificate works with the output-traced Gram
$G_{ij} = \mathrm{tr}\, K_{ij}$ ($B \times B$), whose null space is exactly $N$: one coefficient
per sequence. The $z$ seen by the heads are $A^\top e \sim N(0, \sigma_A^2 |e|^2 / d\, I)$ for
Gaussian $A$; the certificate chooses $\sigma_A$ so that they have the law of the $z$ samples of
the LSE tests.

**Token-wise outputs** (all final tokens) are *not* governed by this criterion: their features
are $\partial_\theta a_\theta[\mu^i](x^i_k)$ at each sequence's own tokens, not at a shared query.

**The three tests** (each a singular-value test on a matrix with one column per sequence):

1. `lse_test` (`mod_affine` / `mod_constants`): columns $\mathrm{LSE}_i(z_s)$ at samples
   $z_s \sim N(0, \sigma_z^2 I)$, each divided by its norm, with $\mathrm{span}\{1, z_1..z_d\}$
   (or $\{1\}$) projected out.
2. `hessian_test`: columns $\mathrm{vec}\, H_i(z_s)$. $\sum_i \gamma_i H_i \equiv 0$ iff
   $\sum_i \gamma_i \mathrm{LSE}_i$ is affine, so this certifies the same modulus as `mod_affine`
   without a projection: linear independence of the tilted-covariance fields. Each column is
   divided by the norm of the second-moment column $\mathrm{vec}(H_i + m_i m_i^\top)$, the
   magnitude at which $H_i = E_{\pi_z}[yy^\top] - m_i m_i^\top$ is computed.
3. `ntk_test`: the readout-query NTK Jacobian at `symmetric_heads`, by block, unscaled (its
   spectrum is the NTK's). For sequences that are all `Discrete` (empirical) it goes through
   `meanfield_tf.flow` (the finite transformer); for analytic families it uses the exact
   zero-velocity formula above with the family's exact LSE (the infinite-token limit). The
   query-key block is compared with `mod_affine`, the value block with `mod_constants`.

**Thresholds.** Each test reports `ratio` $= \sigma_{\min} / \sigma_{\max}$ and declares the
sequences dependent when `ratio <= threshold`, with
$\text{threshold} = \text{safety} \times \varepsilon \times \sqrt{\text{rows}}$,
$\varepsilon$ the dtype's machine epsilon and rows the number of sampled entries per column
($S$, $S d^2$, and $d \times$ #parameters of the block for the NTK); default safety $= 100$.
Rounding errors of a column computed at magnitude $|f|$ are about $\varepsilon |f|$ per entry, so
an exact dependence leaves $\sigma_{\min}/\sigma_{\max} \lesssim \varepsilon \sqrt{\text{rows}}$.
For the Monte-Carlo NTK the same rounding threshold applies: a dependence $\gamma$ annihilates the
Jacobian of *every* head sample exactly, so Monte-Carlo error never makes a dependent set look
independent. It can make an independent set look dependent only with too few heads (the traced
$A$ Gram has rank at most $\frac{M}{2}\frac{d(d+1)}{2}$, the $V$ Gram at most $\frac{M}{2} d$);
`ntk_test` refuses fewer than $B$ ranks and the default uses as many distinct heads as $z$ samples.
Independent ratios scale like the non-affine part of the LSEs at scale $\sigma_z$ (e.g. like
$\sigma_z^2$ spreads for quartic deviations from Gaussianity), so keep $\sigma_z$ moderate
($\approx$ 1/spread of the tokens): too small and every LSE looks quadratic.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._dependence import DEFAULT_SAFETY, DependenceTest, column_scales, svd_dependence
from ._errors import InputError
from ._heads import symmetric_heads
from ._ntk import ReadoutQuery, ntk_jacobian
from ._tokens import Discrete, Family, TokenBatch, discrete_batch, families_from_tokens

def sample_z(key: PRNGKeyArray, num_samples: int, dim: int, scale: float = 1.0,
             dtype=None) -> Float[Array, "S d"]:
    """`num_samples` points $z \\sim N(0, \\text{scale}^2 I_d)$."""
    dtype = dtype or jnp.result_type(float)
    return scale * jax.random.normal(key, (num_samples, dim), dtype)


def _check_families(families: Sequence[Family]) -> int:
    if len(families) == 0:
        raise InputError("the injectivity certificate needs at least one sequence")
    dims = {f.dim for f in families}
    if len(dims) != 1:
        raise InputError(f"all sequences must live in the same dimension d, got {sorted(dims)}")
    return dims.pop()


@eqx.filter_jit
def _lse_one(family, z):
    return family.lse(z)


def lse_columns(families: Sequence[Family], z: Float[Array, "S d"]) -> Float[Array, "S B"]:
    """$\\mathrm{LSE}_{\\mu^i}(z_s)$, one column per sequence (exact LSE of each family)."""
    return jnp.stack([_lse_one(f, z) for f in families], axis=1)


def lse_test(families: Sequence[Family], z: Float[Array, "S d"], *, affine: bool = True,
             safety: float = DEFAULT_SAFETY) -> DependenceTest:
    """Are the LSEs independent modulo affine functions (`affine=True`) or constants?

    Columns $\\mathrm{LSE}_i(z_s)$ are divided by their norms (the magnitude at which they are
    computed, so that a column affine up to rounding stays at rounding level), then the
    orthogonal projection onto the complement of $\\mathrm{span}\\{1, z_1, .., z_d\\}$ (or
    $\\{1\\}$) is applied and `svd_dependence` decides.
    """
    _check_families(families)
    cols = np.asarray(lse_columns(families, jnp.asarray(z)))
    z = np.asarray(z)
    scales = column_scales(cols)
    cols = cols / scales
    basis = np.ones((z.shape[0], 1), z.dtype)
    if affine:
        basis = np.concatenate([basis, z], axis=1)
    q, _ = np.linalg.qr(basis)
    resid = cols - q @ (q.T @ cols)
    return svd_dependence(resid, scales=scales, safety=safety)


@eqx.filter_jit
def lse_derivatives(family: Family, z: Float[Array, "S d"]):
    """Gradient $m(z)$ `(S, d)` and Hessian $H(z)$ `(S, d, d)` of the family's exact LSE."""
    grad = jax.vmap(jax.grad(family.lse))(z)
    hess = jax.vmap(jax.hessian(family.lse))(z)
    return grad, hess


def hessian_test(families: Sequence[Family], z: Float[Array, "S d"], *,
                 safety: float = DEFAULT_SAFETY) -> DependenceTest:
    """Rank test on the tilted covariances $H_i(z_s) = \\nabla^2 \\mathrm{LSE}_i(z_s)$.

    $\\sum_i c_i H_i \\equiv 0$ iff $\\sum_i c_i \\mathrm{LSE}_i$ is affine: this certifies
    independence modulo affine functions, sampled at the $z_s$. Column $i$ is
    $\\mathrm{vec}\\,H_i(z_s)$ over all samples (`S d^2` rows), divided by the norm of the
    second moments $\\mathrm{vec}(H_i + m_i m_i^\\top)$.
    """
    _check_families(families)
    z = jnp.asarray(z)
    cols, refs = [], []
    for f in families:
        g, h = (np.asarray(a) for a in lse_derivatives(f, z))
        cols.append(h.reshape(-1))
        refs.append((h + g[:, :, None] * g[:, None, :]).reshape(-1))
    cols, refs = np.stack(cols, axis=1), np.stack(refs, axis=1)
    scales = column_scales(refs)
    return svd_dependence(cols / scales, scales=scales, safety=safety)


# ---------------------------------------------------------------------------------------------
# The Monte-Carlo NTK at the symmetric zero-velocity initialisation


def zero_velocity_readout(params: dict[str, Array], families: Sequence[Family],
                          e: Float[Array, " d"]) -> Float[Array, "B d"]:
    r"""First-order readout $Y_i = e + \frac{1}{LM}\sum_{l,m} V_{lm} \nabla\mathrm{LSE}_i(A_{lm}^\top e)$.

    At a zero-velocity head measure its Jacobian in `params` (`{"A","V"}`, each `(L, M, d, d)`)
    equals the Jacobian of the readout query through the flow; with an analytic family's exact
    LSE it is the infinite-token limit of that Jacobian.
    """
    return jnp.stack([_readout_one(params, f, e) for f in families])


def _readout_one(params, family, e):
    A, V = params["A"], params["V"]
    lead = A.shape[:-2]
    z = jnp.einsum("...ij,i->...j", A, e).reshape(-1, e.shape[0])
    g = jax.vmap(jax.grad(family.lse))(z).reshape(*lead, -1)
    return e + jnp.einsum("...ij,...j->...i", V, g).mean(axis=(0, 1))


@eqx.filter_jit
def _readout_jacobian_one(params, family, e):
    return jax.jacrev(_readout_one)(params, family, e)


@dataclasses.dataclass(frozen=True)
class NTKTest:
    """The NTK test by block (`"A"`, `"V"`, `"full"`), and how the Jacobian was computed
    (`source`: `"flow"` through the finite transformer, or `"exact_lse"`)."""

    blocks: dict[str, DependenceTest]
    source: str
    num_heads: int


def ntk_test(
    families: Sequence[Family],
    *,
    key: PRNGKeyArray,
    num_heads: int = 1024,
    z_scale: float = 1.0,
    query: Float[Array, " d"] | None = None,
    num_layers: int = 1,
    scale_V: float = 1.0,
    safety: float = DEFAULT_SAFETY,
) -> NTKTest:
    r"""Singular-value test on the readout-query NTK at `symmetric_heads` (zero velocity).

    **Arguments:**

    - `families`: the `B` sequences. All `Discrete` → the Jacobian is taken through
      `meanfield_tf.flow` (Euler, the finite transformer) on their atoms; otherwise through
      `zero_velocity_readout` with the exact LSEs (infinite-token limit).
    - `key`, `num_heads` (`M`, even; `M/2` distinct heads per layer), `num_layers`: the
      symmetric head sample.
    - `z_scale`: the heads' $A$ scale is set so that $z = A^\top e \sim N(0, \sigma_z^2 I)$.
    - `query`: the readout token $e$ `(d,)` (default $(1,..,1)/\sqrt d$).

    **Returns:** an `NTKTest` whose block `b` is `svd_dependence` of the matrix with column $i$
    the Jacobian rows $\partial Y_i / \partial\theta^b$ (all output coordinates and particles),
    i.e. the square root of the spectrum of the output-traced Gram $G_{ij} = \mathrm{tr}\,K_{ij}$.
    Block `"A"` certifies independence modulo affine functions, `"V"` and `"full"` modulo
    constants.
    """
    d = _check_families(families)
    b = len(families)
    dtype = jnp.result_type(float)
    if num_heads < 2 or num_heads % 2:
        raise InputError(f"num_heads must be even and >= 2 (symmetric pairs), got {num_heads}")
    distinct = num_layers * num_heads // 2
    if distinct * d < b:
        raise InputError(
            f"{distinct} distinct heads in d={d} give an NTK of rank at most {distinct * d} < "
            f"{b} sequences; raise num_heads to at least {2 * -(-b // (d * num_layers))}"
        )
    e = jnp.full((d,), 1.0 / np.sqrt(d), dtype) if query is None else jnp.asarray(query, dtype)
    norm_e = float(jnp.linalg.norm(e))
    if e.shape != (d,) or norm_e == 0:
        raise InputError(f"the readout query must be a nonzero vector of shape ({d},)")
    heads = symmetric_heads(key, num_layers, num_heads, d, scale_A=z_scale * np.sqrt(d) / norm_e,
                            scale_V=scale_V, dtype=dtype)
    if all(isinstance(f, Discrete) for f in families):
        jac = ntk_jacobian(heads, discrete_batch(families), output=ReadoutQuery(e))
        source = "flow"
    else:
        per = [_readout_jacobian_one(heads.params, f, e) for f in families]
        jac = {k: jnp.stack([p[k] for p in per]) for k in per[0]}
        source = "exact_lse"
    flats = {k: np.asarray(v).reshape(b, -1).T for k, v in jac.items()}
    flats["full"] = np.concatenate([flats["A"], flats["V"]], axis=0)
    blocks = {k: svd_dependence(v, safety=safety) for k, v in flats.items()}
    return NTKTest(blocks=blocks, source=source, num_heads=num_heads)


# ---------------------------------------------------------------------------------------------
# The certificate


@dataclasses.dataclass(frozen=True)
class Certificate:
    """The four tests: `mod_affine`, `mod_constants`, `hessian` and `ntk` (the NTK's query-key
    block, which certifies the same modulus as `mod_affine` and `hessian`), plus `ntk` by block
    (`ntk_blocks["V"]` and `["full"]` certify the modulus of `mod_constants`)."""

    tests: dict[str, DependenceTest]
    ntk: NTKTest
    z_scale: float
    num_samples: int

    @property
    def agree(self) -> bool:
        """Do the tests that certify the same modulus reach the same verdict?"""
        t, blk = self.tests, self.ntk.blocks
        affine = {t["mod_affine"].independent, t["hessian"].independent, blk["A"].independent}
        const = {t["mod_constants"].independent, blk["V"].independent, blk["full"].independent}
        return len(affine) == 1 and len(const) == 1


def injectivity_certificate(
    families: Sequence[Family] | TokenBatch,
    *,
    key: PRNGKeyArray,
    num_samples: int = 512,
    z_scale: float = 1.0,
    num_heads: int | None = None,
    query: Float[Array, " d"] | None = None,
    safety: float = DEFAULT_SAFETY,
) -> Certificate:
    """Run the three tests of the LSE injectivity criterion on `B` sequences.

    **Arguments:**

    - `families`: analytic families (`Gaussian`, `GaussianMixture`, `UniformBox`,
      `UniformBall`, `Discrete`) or a `TokenBatch` of empirical sequences.
    - `key`: PRNG key for the $z$ samples and the head sample.
    - `num_samples`: $S$, the number of $z \\sim N(0, \\sigma_z^2 I)$ (at least `B + d + 1`).
    - `z_scale`: $\\sigma_z$, moderate (about 1 / spread of the sequences).
    - `num_heads`: `M` of the symmetric head sample (default `2 S`: `S` distinct heads).
    - `query`: the readout token of the NTK test.
    - `safety`: the threshold's safety factor.

    **Returns:** a `Certificate`; `cert.tests[name].independent` is the verdict of each test.
    """
    if isinstance(families, TokenBatch):
        families = families_from_tokens(families)
    families = list(families)
    d = _check_families(families)
    if num_samples < len(families) + d + 1:
        raise InputError(
            f"num_samples={num_samples} is too small for {len(families)} sequences in d={d}; "
            f"use at least {len(families) + d + 1} (a few hundred is typical)"
        )
    if not z_scale > 0:
        raise InputError(f"z_scale must be > 0, got {z_scale}")
    kz, kh = jax.random.split(key)
    z = sample_z(kz, num_samples, d, z_scale)
    tests = {
        "mod_affine": lse_test(families, z, affine=True, safety=safety),
        "mod_constants": lse_test(families, z, affine=False, safety=safety),
        "hessian": hessian_test(families, z, safety=safety),
    }
    ntk = ntk_test(families, key=kh, num_heads=num_heads or 2 * num_samples, z_scale=z_scale,
                   query=query, safety=safety)
    tests["ntk"] = ntk.blocks["A"]
    return Certificate(tests=tests, ntk=ntk, z_scale=float(z_scale), num_samples=num_samples)
