"""Online softmax in Pallas (JAX): the same algorithm as the Triton kernel, laid out the TPU way.

Two pallas_calls over a (row blocks, column blocks) grid:
  1. statistics: the column axis is the innermost ("arbitrary") grid axis; the m and d output
     blocks keep the same index along it, so they stay resident in VMEM/SRAM while the tiles
     of one row block stream past, updated by the online rule
         m' = max(m, max_j x_j),  d' = d·exp(m − m') + Σ_j exp(x_j − m')   (Algorithm 3);
  2. normalise: each tile is read again and written once as exp(x − m) / d.
Global memory sees 2 reads and 1 write per element, as in Algorithm 3.
Edge tiles are masked with an iota against the true row length, so any N works.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.device import pallas_interpret

_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def _masked_tile(x_ref, n_cols, block_n):
    """The current tile as float32, lanes past the row's end set to −inf."""
    col = pl.program_id(1) * block_n + jax.lax.broadcasted_iota(jnp.int32, x_ref.shape, 1)
    return jnp.where(col < n_cols, x_ref[...].astype(jnp.float32), -jnp.inf)


def _rescaled_exp(x, m):
    return jnp.where(m == -jnp.inf, 0.0, jnp.exp(x - m))


def _stats_kernel(x_ref, m_ref, d_ref, *, n_cols, block_n):
    @pl.when(pl.program_id(1) == 0)
    def _init():  # outputs start undefined (NaN in interpret mode): initialise them
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        d_ref[...] = jnp.zeros(d_ref.shape, jnp.float32)

    x = _masked_tile(x_ref, n_cols, block_n)
    m = m_ref[...]
    m_new = jnp.maximum(m, x.max(axis=1, keepdims=True))
    d_ref[...] = d_ref[...] * _rescaled_exp(m, m_new) + _rescaled_exp(x, m_new).sum(
        axis=1, keepdims=True)
    m_ref[...] = m_new


def _normalise_kernel(x_ref, m_ref, d_ref, o_ref, *, n_cols, block_n):
    x = _masked_tile(x_ref, n_cols, block_n)
    o_ref[...] = (jnp.exp(x - m_ref[...]) / d_ref[...]).astype(o_ref.dtype)


def _blocks(n_rows: int, n_cols: int, block_size: int | None) -> tuple[int, int]:
    if block_size is None:
        block_n = min(pl.next_power_of_2(n_cols), 2048)
    elif not isinstance(block_size, int) or block_size < 128 or block_size & (block_size - 1):
        # TPU tiles are (8, 128)-aligned: the column block must be a power of two >= 128
        raise ValueError(f"block_size must be a power of two >= 128, got {block_size!r}")
    else:
        block_n = block_size
    block_n = max(block_n, 128)
    block_m = max(8, min(pl.next_power_of_2(n_rows), 8192 // block_n))
    assert block_m % 8 == 0 and block_n % 128 == 0, (block_m, block_n)  # TPU tiling rule
    return block_m, block_n


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret"))
def _softmax_2d(x, *, block_m, block_n, interpret):
    n_rows, n_cols = x.shape
    grid = (pl.cdiv(n_rows, block_m), pl.cdiv(n_cols, block_n))
    tile = pl.BlockSpec((block_m, block_n), lambda i, j: (i, j))
    row_stat = pl.BlockSpec((block_m, 1), lambda i, j: (i, 0))  # same block for every j
    stat = jax.ShapeDtypeStruct((n_rows, 1), jnp.float32)
    kw = dict(n_cols=n_cols, block_n=block_n)
    m, d = pl.pallas_call(
        functools.partial(_stats_kernel, **kw), grid=grid, in_specs=[tile],
        out_specs=[row_stat, row_stat], out_shape=[stat, stat], interpret=interpret)(x)
    return pl.pallas_call(
        functools.partial(_normalise_kernel, **kw), grid=grid,
        in_specs=[tile, row_stat, row_stat], out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x, m, d)


def softmax_pallas(x: jax.Array, axis: int = -1, *, block_size: int | None = None) -> jax.Array:
    """Softmax along `axis` with the online normaliser, in Pallas (interpret mode on CPU)."""
    if not isinstance(x, jax.Array):
        raise TypeError(f"x must be a jax.Array, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must have dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape})")
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for x with {x.ndim} dimensions")
    moved = jnp.moveaxis(x, axis, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    block_m, block_n = _blocks(*rows.shape, block_size)
    out = _softmax_2d(rows, block_m=block_m, block_n=block_n, interpret=pallas_interpret())
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis)
