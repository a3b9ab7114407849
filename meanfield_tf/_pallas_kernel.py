r"""A fused attention kernel written in Pallas (Triton on GPU, interpret mode on CPU).

For one sequence $\mu = \sum_j w_j \delta_{x_j}$ and $M$ heads $(A_m, V_m)$ the $R = Mn$
(head, query) rows $z_{mi} = A_m^\top x_i$ all attend to the same keys, which are also the
values: with $s_{rj} = z_r^\top x_j + \log w_j$, $\ell_r = \mathrm{LSE}_j\, s_{rj}$,
$p_{rj} = e^{s_{rj} - \ell_r}$ and $y_r = \sum_j p_{rj} x_j$,

$$v_i = \frac1M \sum_m V_m\, y_{mi}.$$

The queries $z$ and the head mean are plain XLA products ($O(M n d^2)$); the $O(M n^2 d)$ part,
$y$ and $\ell$ from $z$, $x$, $\log w$, is three Pallas kernels:

- **forward** — grid over blocks of `block_rows` rows; each program keeps its rows' running
  max, running normaliser and `(rows, d)` accumulator (online log-sum-exp) while looping over
  the keys in blocks of `block_keys`. It writes $y$ and $\ell$: memory linear in $n$.
- **backward, queries** — grid over row blocks; with the cotangent $\bar y_r$ and
  $D_r = \bar y_r^\top y_r$, the scores are recomputed from the saved $\ell$ and
  $\bar s_{rj} = p_{rj}(\bar y_r^\top x_j - D_r)$, $\bar z_r = \sum_j \bar s_{rj} x_j$.
- **backward, keys** — grid over (key block, row split): each program loops over its share of
  the rows and accumulates $\bar x_j = \sum_r p_{rj} \bar y_r + \bar s_{rj} z_r$ (the key as
  value and as key) and $\overline{\log w}_j = \sum_r \bar s_{rj}$; the `key_splits` partial sums
  are added afterwards (more programs than key blocks keep a large GPU busy).

The same maths as `meanfield_tf._flash` (which streams in XLA); JAX differentiates the cheap
outer products (queries, head mean, $\log w$), so $\bar x$ also gets its query-role term
$\sum_m A_m \bar z_{mi}$ and $\bar w_j = \overline{\log w}_j / w_j$ ($0$ at padding, $w_j = 0$).

**Ragged sizes.** Rows are padded with zero rows, keys with zero tokens of weight 0
($\log w = -\infty$: exact padding, $p = 0$) and the feature axis with zeros up to a power of two
$\ge 16$ (Triton's block shapes; zero features change no score and no value).
Scores, exp and normaliser are float32 (or float64 for float64 inputs, in interpret mode); the
products follow the `Precision` policy.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from ._errors import InputError
from ._attention import AbstractKernel
from ._precision import FLOAT32, Precision
from ._tokens import log_weights


class _Config(eqx.Module):
    """Static configuration of one call of the Pallas kernels (hashable: a `custom_vjp` argument)."""

    block_rows: int = eqx.field(static=True)
    block_keys: int = eqx.field(static=True)
    key_splits: int = eqx.field(static=True)
    interpret: bool = eqx.field(static=True)
    precision: Precision = eqx.field(static=True)
    num_warps: int = eqx.field(static=True)
    num_stages: int = eqx.field(static=True)


def _dot(prec: Precision, a, b, contract: tuple[int, int], acc):
    """`a · b` contracting axis `contract[0]` of `a` with `contract[1]` of `b` (2-D operands)."""
    a = prec.cast(a)
    b = prec.cast(b)
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec.lax_precision, preferred_element_type=acc)


def _fwd_kernel(z_ref, k_ref, lw_ref, y_ref, lse_ref, *, cfg: _Config, num_key_blocks: int):
    prec, bk = cfg.precision, cfg.block_keys
    acc = lse_ref.dtype
    z = z_ref[...]
    rows, feat = z.shape

    def body(j, carry):
        run_max, total, out = carry
        keys = k_ref[pl.ds(j * bk, bk), :]
        s = _dot(prec, z, keys, (1, 1), acc) + lw_ref[pl.ds(j * bk, bk)][None, :]
        new_max = jnp.maximum(run_max, jnp.max(s, axis=1))
        safe = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        corr = jnp.exp(run_max - safe)
        p = jnp.exp(s - safe[:, None])
        total = total * corr + jnp.sum(p, axis=1)
        out = out * corr[:, None] + _dot(prec, p, keys, (1, 0), acc)
        return new_max, total, out

    init = (
        jnp.full((rows,), -jnp.inf, acc),
        jnp.zeros((rows,), acc),
        jnp.zeros((rows, feat), acc),
    )
    run_max, total, out = jax.lax.fori_loop(0, num_key_blocks, body, init)
    safe = jnp.where(run_max == -jnp.inf, 0.0, run_max)
    y_ref[...] = (out / total[:, None]).astype(y_ref.dtype)
    lse_ref[...] = safe + jnp.log(total)


def _dq_kernel(z_ref, gy_ref, d_ref, lse_ref, k_ref, lw_ref, dz_ref, *, cfg: _Config, num_key_blocks: int):
    prec, bk = cfg.precision, cfg.block_keys
    acc = lse_ref.dtype
    z, gy, dd, lse = z_ref[...], gy_ref[...], d_ref[...], lse_ref[...]

    def body(j, dz):
        keys = k_ref[pl.ds(j * bk, bk), :]
        s = _dot(prec, z, keys, (1, 1), acc) + lw_ref[pl.ds(j * bk, bk)][None, :]
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(prec, gy, keys, (1, 1), acc) - dd[:, None])
        return dz + _dot(prec, ds, keys, (1, 0), acc)

    dz = jax.lax.fori_loop(0, num_key_blocks, body, jnp.zeros(z.shape, acc))
    dz_ref[...] = dz.astype(dz_ref.dtype)


def _dkv_kernel(z_ref, gy_ref, d_ref, lse_ref, k_ref, lw_ref, dk_ref, dlw_ref, *, cfg: _Config,
                blocks_per_split: int):
    prec, br = cfg.precision, cfg.block_rows
    acc = dlw_ref.dtype
    keys, lw = k_ref[...], lw_ref[...]
    first = pl.program_id(1) * blocks_per_split

    def body(r, carry):
        dk, dlw = carry
        rs = pl.ds((first + r) * br, br)
        z, gy, dd, lse = z_ref[rs, :], gy_ref[rs, :], d_ref[rs], lse_ref[rs]
        st = _dot(prec, keys, z, (1, 1), acc) + lw[:, None]  # (keys, rows)
        pt = jnp.exp(st - lse[None, :])
        dst = pt * (_dot(prec, keys, gy, (1, 1), acc) - dd[None, :])
        dk = dk + _dot(prec, pt, gy, (1, 0), acc) + _dot(prec, dst, z, (1, 0), acc)
        return dk, dlw + jnp.sum(dst, axis=1)

    init = (jnp.zeros(keys.shape, acc), jnp.zeros(lw.shape, acc))
    dk, dlw = jax.lax.fori_loop(0, blocks_per_split, body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dlw_ref[...] = dlw


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg: _Config):
    kwargs = {}
    if not cfg.interpret:
        from jax.experimental.pallas import triton as plgpu

        kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret, **kwargs,
    )


def _mqa_forward(z, keys, lw, cfg: _Config):
    rows, feat = z.shape
    n_keys = keys.shape[0]
    br, bk = cfg.block_rows, cfg.block_keys
    acc = lw.dtype
    kernel = functools.partial(_fwd_kernel, cfg=cfg, num_key_blocks=n_keys // bk)
    return _call(
        kernel,
        grid=(rows // br,),
        in_specs=[
            pl.BlockSpec((br, feat), lambda i: (i, 0)),
            pl.BlockSpec((n_keys, feat), lambda i: (0, 0)),
            pl.BlockSpec((n_keys,), lambda i: (0,)),
        ],
        out_specs=[pl.BlockSpec((br, feat), lambda i: (i, 0)), pl.BlockSpec((br,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((rows, feat), z.dtype), jax.ShapeDtypeStruct((rows,), acc)],
        cfg=cfg,
    )(z, keys, lw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mqa(z, keys, lw, cfg: _Config):
    """Row means `y` `(R, D)` of the rows `z` `(R, D)` over `keys` `(N, D)` with log-weights `lw` `(N,)`.

    `R`, `N` multiples of `block_rows`·`key_splits` and `block_keys`; `lw` in the accumulation dtype.
    """
    return _mqa_forward(z, keys, lw, cfg)[0]


def _mqa_fwd(z, keys, lw, cfg):
    y, lse = _mqa_forward(z, keys, lw, cfg)
    return y, (z, keys, lw, y, lse)


def _mqa_bwd(cfg, res, gy):
    z, keys, lw, y, lse = res
    rows, feat = z.shape
    n_keys = keys.shape[0]
    br, bk, splits = cfg.block_rows, cfg.block_keys, cfg.key_splits
    acc = lw.dtype
    dd = jnp.sum(gy.astype(acc) * y.astype(acc), axis=1)
    row_spec = pl.BlockSpec((br, feat), lambda i: (i, 0))
    row_vec = pl.BlockSpec((br,), lambda i: (i,))
    dz = _call(
        functools.partial(_dq_kernel, cfg=cfg, num_key_blocks=n_keys // bk),
        grid=(rows // br,),
        in_specs=[
            row_spec, row_spec, row_vec, row_vec,
            pl.BlockSpec((n_keys, feat), lambda i: (0, 0)),
            pl.BlockSpec((n_keys,), lambda i: (0,)),
        ],
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct((rows, feat), z.dtype),
        cfg=cfg,
    )(z, gy, dd, lse, keys, lw)
    all_rows = pl.BlockSpec((rows, feat), lambda kb, s: (0, 0))
    all_vec = pl.BlockSpec((rows,), lambda kb, s: (0,))
    dk, dlw = _call(
        functools.partial(_dkv_kernel, cfg=cfg, blocks_per_split=rows // (br * splits)),
        grid=(n_keys // bk, splits),
        in_specs=[
            all_rows, all_rows, all_vec, all_vec,
            pl.BlockSpec((bk, feat), lambda kb, s: (kb, 0)),
            pl.BlockSpec((bk,), lambda kb, s: (kb,)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, feat), lambda kb, s: (s, kb, 0)),
            pl.BlockSpec((None, bk), lambda kb, s: (s, kb)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, n_keys, feat), acc),
            jax.ShapeDtypeStruct((splits, n_keys), acc),
        ],
        cfg=cfg,
    )(z, gy, dd, lse, keys, lw)
    return dz, dk.sum(axis=0).astype(keys.dtype), dlw.sum(axis=0)


_mqa.defvjp(_mqa_fwd, _mqa_bwd)


def _pad_axis(a: Array, axis: int, size: int, fill) -> Array:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths, constant_values=fill)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PallasKernel(AbstractKernel):
    """Fused online-LSE attention in Pallas, with its own backward pass; memory linear in `n`.

    **Fields:**

    - `block_rows`: (head, query) rows per program (default 64); a power of two on GPU.
    - `block_keys`: keys per inner-loop step (default 64); a power of two on GPU.
    - `key_splits`: row groups of the key-gradient kernel (default `None`: enough groups for
      about 512 programs, at most one per row block); the partial key gradients
      `(key_splits, n, d)` are summed afterwards.
    - `interpret`: `None` (default: interpret mode unless the default backend is a GPU),
      `True` / `False` to force it. Interpret mode runs anywhere (slowly) and supports float64.
    - `precision`: a `Precision` (default float32: IEEE products; `TF32`; `BF16` operands).
    - `num_warps`, `num_stages`: Triton launch parameters (GPU only).

    The gradient in the weights `w` is exact where `w > 0` and 0 at padding (`w = 0`).
    """

    block_rows: int = eqx.field(static=True, default=64)
    block_keys: int = eqx.field(static=True, default=64)
    key_splits: int | None = eqx.field(static=True, default=None)
    interpret: bool | None = eqx.field(static=True, default=None)
    precision: Precision = FLOAT32
    num_warps: int = eqx.field(static=True, default=4)
    num_stages: int = eqx.field(static=True, default=2)

    def plain_softmax(self):
        return True

    def __check_init__(self):
        for name in ("block_rows", "block_keys"):
            size = getattr(self, name)
            if size < 1:
                raise InputError(f"PallasKernel {name} must be >= 1, got {size}")
        if self.key_splits is not None and self.key_splits < 1:
            raise InputError(f"PallasKernel key_splits must be >= 1 or None (automatic), got {self.key_splits}")
        if not isinstance(self.precision, Precision):
            raise InputError(
                f"PallasKernel precision must be a Precision (e.g. FLOAT32, TF32, BF16), "
                f"got {type(self.precision).__name__}"
            )

    def _config(self, rows: int, n_keys: int) -> _Config:
        interpret = self.interpret if self.interpret is not None else jax.default_backend() != "gpu"
        if not interpret:
            for name in ("block_rows", "block_keys"):
                size = getattr(self, name)
                if size < 16 or size & (size - 1):
                    raise InputError(
                        f"PallasKernel {name} must be a power of two >= 16 on GPU (Triton), got {size}"
                    )
        row_blocks = _cdiv(rows, self.block_rows)
        key_blocks = _cdiv(n_keys, self.block_keys)
        splits = self.key_splits if self.key_splits is not None else max(1, 512 // key_blocks)
        splits = min(splits, row_blocks)
        splits = _cdiv(row_blocks, _cdiv(row_blocks, splits))  # fewest splits of that many blocks
        return _Config(
            block_rows=self.block_rows, block_keys=self.block_keys, key_splits=splits,
            interpret=interpret, precision=self.precision,
            num_warps=self.num_warps, num_stages=self.num_stages,
        )

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        n, d = x.shape
        m_heads = A.shape[0]
        rows = m_heads * n
        cfg = self._config(rows, n)
        acc = Precision.accumulate_dtype(x.dtype)
        hi = jax.lax.Precision.HIGHEST
        feat = max(16, pl.next_power_of_2(d))
        row_chunk = cfg.block_rows * cfg.key_splits
        rows_p = _cdiv(rows, row_chunk) * row_chunk
        keys_p = _cdiv(n, cfg.block_keys) * cfg.block_keys

        z = jnp.einsum("nd,mde->mne", x, A, precision=hi).reshape(rows, d)
        z = _pad_axis(_pad_axis(z, 1, feat, 0), 0, rows_p, 0)
        keys = _pad_axis(_pad_axis(x, 1, feat, 0), 0, keys_p, 0)
        lw = _pad_axis(log_weights(w).astype(acc), 0, keys_p, -jnp.inf)
        y = _mqa(z, keys, lw, cfg)[:rows, :d].reshape(m_heads, n, d)
        v = jnp.einsum("med,mnd->ne", V.astype(acc), y.astype(acc), precision=hi) / m_heads
        return v.astype(x.dtype)


