r"""Learning tasks: what the head measure is trained to do, as data generators with their risks.

A task hands out `Batch`es — a `TokenBatch` of input sequences and the risk
(`meanfield_tf._risks`) that holds their targets — through a pure, jittable
`train_batch(key, step)`, so that the batch of step `k` is a function of the PRNG key and `k`
only (a resumed run sees exactly the batches an uninterrupted one would). `test_batch()` gives a
fixed held-out batch (or `None`).

- `TeacherStudent`: targets are the outputs of a *teacher* head measure near the initial one,
  `θ* = θ0 + δ ξ` (small initial loss); readout query (`QueryRegression`) or every token
  (`TokenRegression`). Full batch.
- `InContextRegression`: tokens `(x_k, <β, x_k>)`, β drawn per sequence; the prediction is the last
  coordinate of a query token `(x_q, 0)`; fresh sequences every step.
- `Digits`: scikit-learn's 8×8 digits as sequences of 64 pixel tokens (optionally weighted by
  their ink), classified by the readout
  query's logits (`QueryClassification`, cross-entropy); mini-batches of the training split.
- `DistributionMatching`: the Sinkhorn divergence (`SinkhornRisk`) between every output token
  measure and its target measure. Full batch.
"""

from __future__ import annotations

import abc
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._errors import InputError
from ._heads import HeadMeasure
from ._risks import AbstractRisk, QueryClassification, QueryRegression, SinkhornRisk, TokenRegression
from ._tokens import TokenBatch


class Batch(eqx.Module):
    """Input sequences and the risk holding their targets: `R = risk(X_1, tokens.w)`."""

    tokens: TokenBatch
    risk: AbstractRisk


class AbstractTask(eqx.Module):
    """Base class of the tasks: `train_batch(key, step)` (pure) and `test_batch()`."""

    @abc.abstractmethod
    def train_batch(self, key: PRNGKeyArray, step) -> Batch:
        """The batch of training step `step`: a pure function of `key` and `step`."""

    def test_batch(self) -> Batch | None:
        """A fixed held-out batch, or `None` when the task has none."""
        return None


# ---------------------------------------------------------------------------------------------
# Teacher–student


def perturbed_heads(heads: HeadMeasure, noise: HeadMeasure, scale) -> HeadMeasure:
    """`θ0 + scale · ξ` particle by particle (the teacher of `TeacherStudent`)."""
    params = jax.tree.map(lambda a, b: a + jnp.asarray(scale, a.dtype) * b, heads.params, noise.params)
    return eqx.tree_at(lambda h: h.params, heads, params)


class TeacherStudent(AbstractTask):
    """Fit the outputs of a teacher head measure on a fixed set of sequences (full batch).

    Build with `TeacherStudent.make(teacher, tokens, forward, readout=...)`: `forward(heads,
    tokens) -> X_1` is the depth solve (the same one the student uses), `readout="query"` fits the
    final position of the last token (append a query first), `"tokens"` every token.
    """

    batch: Batch

    @classmethod
    def make(cls, teacher: HeadMeasure, tokens: TokenBatch,
             forward: Callable[[HeadMeasure, TokenBatch], Array], *, readout: str = "query"):
        y = jax.lax.stop_gradient(forward(teacher, tokens))
        if readout == "query":
            if float(np.asarray(tokens.w)[:, -1].max()) != 0.0:
                raise InputError("readout='query' needs tokens with an appended query "
                                 "(tokens.append_query(e))")
            risk = QueryRegression(y[:, -1])
        elif readout == "tokens":
            risk = TokenRegression(y)
        else:
            raise InputError(f"readout must be 'query' or 'tokens', got {readout!r}")
        risk.validate(tokens)
        return cls(Batch(tokens, risk))

    def train_batch(self, key, step) -> Batch:
        return self.batch


# ---------------------------------------------------------------------------------------------
# In-context linear regression


def in_context_regression_batch(key: PRNGKeyArray, batch_size: int, n: int, dim_x: int, *,
                                noise=0.0, dtype=None) -> Batch:
    r"""`batch_size` sequences of `n` tokens $(x_k, \langle\beta, x_k\rangle + \sigma\epsilon_k)$ in
    $\mathbb R^{d_x + 1}$, $x_k \sim N(0, I)$, $\beta \sim N(0, I/d_x)$ per sequence, plus a query
    $(x_q, 0)$ of weight 0. The risk is $\tfrac12(\hat y - \langle\beta, x_q\rangle)^2$ with $\hat y$
    the last coordinate of the query's final position."""
    dtype = dtype or jnp.result_type(float)
    kb, kx, kq, ke = jax.random.split(key, 4)
    beta = jax.random.normal(kb, (batch_size, dim_x), dtype) / jnp.sqrt(jnp.asarray(dim_x, dtype))
    xs = jax.random.normal(kx, (batch_size, n, dim_x), dtype)
    ys = jnp.einsum("bnd,bd->bn", xs, beta) + jnp.asarray(noise, dtype) * jax.random.normal(
        ke, (batch_size, n), dtype)
    xq = jax.random.normal(kq, (batch_size, dim_x), dtype)
    yq = jnp.einsum("bd,bd->b", xq, beta)
    x = jnp.concatenate([xs, ys[..., None]], axis=-1)
    q = jnp.concatenate([xq, jnp.zeros((batch_size, 1), dtype)], axis=-1)
    w = jnp.full((batch_size, n), 1.0 / n, dtype)
    readout = jnp.zeros((1, dim_x + 1), dtype).at[0, -1].set(1.0)
    tokens = TokenBatch(x, w, check=False).append_query(q)
    return Batch(tokens, QueryRegression(yq[:, None], readout=readout))


class InContextRegression(AbstractTask):
    """Fresh in-context regression sequences every step; a fixed test set."""

    batch_size: int = eqx.field(static=True)
    n: int = eqx.field(static=True)
    dim_x: int = eqx.field(static=True)
    noise: Array
    test: Batch

    def __init__(self, key, *, batch_size: int, n: int, dim_x: int, test_size: int, noise=0.0,
                 dtype=None):
        dtype = dtype or jnp.result_type(float)
        self.batch_size, self.n, self.dim_x = batch_size, n, dim_x
        self.noise = jnp.asarray(noise, dtype)
        self.test = in_context_regression_batch(key, test_size, n, dim_x, noise=0.0, dtype=dtype)

    def train_batch(self, key, step) -> Batch:
        return in_context_regression_batch(jax.random.fold_in(key, step), self.batch_size, self.n,
                                           self.dim_x, noise=self.noise, dtype=self.noise.dtype)

    def test_batch(self) -> Batch:
        return self.test


# ---------------------------------------------------------------------------------------------
# Digits


DIGIT_CLASSES = 10
DIGIT_TOKEN_DIM = 3 + DIGIT_CLASSES


def digit_tokens(images: np.ndarray, dtype=None) -> Float[Array, "N 64 13"]:
    """8×8 images `(N, 64)` with intensities in [0, 16] → pixel tokens `(N, 64, 13)`:
    `(row, column, intensity, 0, ..., 0)` with row, column and intensity scaled to [-1, 1]."""
    dtype = dtype or jnp.result_type(float)
    images = np.asarray(images, np.float64)
    r, c = np.divmod(np.arange(64), 8)
    pos = np.stack([2 * r / 7 - 1, 2 * c / 7 - 1], axis=-1)  # (64, 2)
    n = images.shape[0]
    tok = np.zeros((n, 64, DIGIT_TOKEN_DIM))
    tok[:, :, :2] = pos
    tok[:, :, 2] = images / 8.0 - 1.0
    return jnp.asarray(tok, dtype)


def digits_readout(dtype=None) -> Float[Array, "10 13"]:
    """The class logits are the last 10 coordinates of the query: `P = [0 | I_10]`."""
    dtype = dtype or jnp.result_type(float)
    return jnp.concatenate([jnp.zeros((DIGIT_CLASSES, 3), dtype), jnp.eye(DIGIT_CLASSES, dtype=dtype)],
                           axis=1)


class Digits(AbstractTask):
    """scikit-learn's 8×8 digits, classified through a readout query token by cross-entropy.

    `x_train` `(N, 64, 13)` and labels; mini-batches of `batch_size` drawn without replacement
    from the training split at every step; the whole test split is the test batch. Token weights
    are uniform (`1/64`), or with `ink_weights=True` proportional to the intensity: the image is
    then the probability measure of its ink, and blank pixels are exact padding.
    """

    x_train: Float[Array, "N 64 13"]
    y_train: Int[Array, " N"]
    x_test: Float[Array, "T 64 13"]
    y_test: Int[Array, " T"]
    query: Float[Array, " 13"]
    batch_size: int = eqx.field(static=True)
    ink_weights: bool = eqx.field(static=True, default=False)

    @classmethod
    def load(cls, *, batch_size: int = 64, test_fraction: float = 0.25, split_seed: int = 0,
             query=None, ink_weights: bool = False, dtype=None):
        """Load the data set shipped with scikit-learn (no download) and split it, stratified."""
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        dtype = dtype or jnp.result_type(float)
        data = load_digits()
        xtr, xte, ytr, yte = train_test_split(data.data, data.target, test_size=test_fraction,
                                              random_state=split_seed, stratify=data.target)
        if batch_size > len(ytr):
            raise InputError(f"batch_size {batch_size} exceeds the {len(ytr)} training images")
        if query is None:
            query = np.zeros(DIGIT_TOKEN_DIM)
            query[2] = 1.0
        query = jnp.asarray(query, dtype)
        if query.shape != (DIGIT_TOKEN_DIM,):
            raise InputError(f"the digits query token must have {DIGIT_TOKEN_DIM} coordinates, "
                             f"got shape {tuple(query.shape)}")
        return cls(digit_tokens(xtr, dtype), jnp.asarray(ytr, jnp.int32), digit_tokens(xte, dtype),
                   jnp.asarray(yte, jnp.int32), query, batch_size, ink_weights)

    def _batch(self, x, y) -> Batch:
        w = self._weights(x)
        tokens = TokenBatch(x, w, check=False).append_query(self.query)
        return Batch(tokens, QueryClassification(y, digits_readout(x.dtype)))

    def _weights(self, x):
        if not self.ink_weights:
            return jnp.full(x.shape[:2], 1.0 / x.shape[1], x.dtype)
        ink = (x[..., 2] + 1.0) / 2.0  # intensity back in [0, 1]
        return ink / jnp.sum(ink, axis=1, keepdims=True)

    def train_batch(self, key, step) -> Batch:
        idx = jax.random.choice(jax.random.fold_in(key, step), self.y_train.shape[0],
                                (self.batch_size,), replace=False)
        return self._batch(self.x_train[idx], self.y_train[idx])

    def test_batch(self) -> Batch:
        return self._batch(self.x_test, self.y_test)


# ---------------------------------------------------------------------------------------------
# Distribution matching


class DistributionMatching(AbstractTask):
    """Push every input sequence onto its target measure (Sinkhorn divergence; full batch)."""

    batch: Batch

    @classmethod
    def make(cls, tokens: TokenBatch, targets: TokenBatch, epsilon, *, threshold=None,
             max_iterations: int = 2000):
        if threshold is None:
            threshold = 1e-9 if tokens.x.dtype == jnp.float64 else 1e-4
        risk = SinkhornRisk(targets.x, targets.w, epsilon, threshold=threshold,
                            max_iterations=max_iterations)
        risk.validate(tokens)
        return cls(Batch(tokens, risk))

    def train_batch(self, key, step) -> Batch:
        return self.batch


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_batch(batch: Batch, x1: Float[Array, "B n d"]) -> dict[str, Array]:
    """Metrics of final tokens `x1` on a batch (`risk.metrics`): `loss`, plus `accuracy` for
    classification."""
    return batch.risk.metrics(x1, batch.tokens.w)
