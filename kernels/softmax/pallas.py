"""Online softmax in Pallas (JAX): the same algorithm as the Triton kernel, two passes.

Two pallas_calls per row block, whatever the backend:
  1. statistics: one pass over the row's column tiles keeps the running max m and normaliser d,
     updated by the online rule
         m' = max(m, max_j x_j),  d' = d·exp(m − m') + Σ_j exp(x_j − m')   (Algorithm 3);
  2. normalise: each tile is read again and written once as exp(x − m) / d.
Global memory sees 2 reads and 1 write per element, as in Algorithm 3, on every backend.

Where the column tiles are walked depends on what the grid may do (kernels/tpu_lowering.py):
- TPU (Mosaic): the column axis is a grid axis marked "arbitrary", so its steps run in order on
  one core; the m and d output blocks keep the same index along it and stay resident in VMEM
  while the tiles stream past (the DMA pipeline prefetches the next tile). Edge blocks are
  clipped copies, so lanes past the row's end hold garbage: they are masked to −inf.
- GPU (Triton): every grid axis runs in parallel, so accumulating across grid steps would race.
  The statistics kernel has one program per row block, which loops over the column tiles with
  `lax.fori_loop`; loads and stores are masked (`plgpu.load/store`), since the Triton lowering
  does not clip edge blocks. Block shapes are powers of two (checked).
- CPU: interpret mode, the TPU variant unless KC_PALLAS_TARGET=gpu (tests run both).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.device import pallas_interpret
from kernels.tpu_lowering import check_gpu_blocks, compiler_params, pallas_target

_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
F32 = jnp.float32


def _in_bounds(shape, row0, col0, n_rows, n_cols):
    """(rows, cols) bool of a tile starting at (row0, col0): inside the (n_rows, n_cols) array."""
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return (rows < n_rows) & (cols < n_cols)


def _load(ref, mask, other, gpu: bool):
    """The tile as float32, `other` outside `mask`; masked in memory on a GPU (no OOB reads)."""
    if gpu:
        return plgpu.load(ref, mask=mask, other=other).astype(F32)
    return jnp.where(mask, ref[...].astype(F32), other)


def _store(ref, value, mask, gpu: bool):
    if gpu:
        plgpu.store(ref, value.astype(ref.dtype), mask=mask)
    else:   # a TPU clips the edge block's copy back to HBM
        ref[...] = value.astype(ref.dtype)


def _online_update(m, d, x):
    """Fold one tile x into the row statistics m, d (block_m, 1) (Algorithm 3, lines 3–4)."""
    m_new = jnp.maximum(m, x.max(axis=1, keepdims=True))
    return m_new, d * _rescaled_exp(m, m_new) + _rescaled_exp(x, m_new).sum(axis=1, keepdims=True)


def _rescaled_exp(x, m):
    return jnp.where(m == -jnp.inf, 0.0, jnp.exp(x - m))


def _stats_kernel_tpu(x_ref, m_ref, d_ref, *, n_rows, n_cols):
    # grid (row blocks, column blocks); m_ref, d_ref: the same (block_m, 1) block for every j
    block_m, block_n = x_ref.shape

    @pl.when(pl.program_id(1) == 0)
    def _init():  # outputs start undefined (NaN in interpret mode): initialise them
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, F32)
        d_ref[...] = jnp.zeros(d_ref.shape, F32)

    mask = _in_bounds(x_ref.shape, pl.program_id(0) * block_m, pl.program_id(1) * block_n,
                      n_rows, n_cols)
    m_ref[...], d_ref[...] = _online_update(m_ref[...], d_ref[...],
                                            _load(x_ref, mask, -jnp.inf, gpu=False))


def _stats_kernel_gpu(x_ref, m_ref, d_ref, *, n_rows, n_cols, block_n):
    # grid (row blocks,); x_ref: (block_m, n_cols), walked one (block_m, block_n) tile at a time
    block_m = m_ref.shape[0]
    row0 = pl.program_id(0) * block_m

    def step(j, carry):
        tile = (block_m, block_n)
        mask = _in_bounds(tile, row0, j * block_n, n_rows, n_cols)
        x = _load(x_ref.at[:, pl.ds(j * block_n, block_n)], mask, -jnp.inf, gpu=True)
        return _online_update(*carry, x)

    init = (jnp.full((block_m, 1), -jnp.inf, F32), jnp.zeros((block_m, 1), F32))
    m, d = jax.lax.fori_loop(0, pl.cdiv(n_cols, block_n), step, init)
    rows_in = _in_bounds((block_m, 1), row0, 0, n_rows, 1)
    _store(m_ref, m, rows_in, gpu=True)
    _store(d_ref, d, rows_in, gpu=True)


def _normalise_kernel(x_ref, m_ref, d_ref, o_ref, *, n_rows, n_cols, gpu):
    block_m, block_n = x_ref.shape
    row0, col0 = pl.program_id(0) * block_m, pl.program_id(1) * block_n
    mask = _in_bounds(x_ref.shape, row0, col0, n_rows, n_cols)
    rows_in = _in_bounds((block_m, 1), row0, 0, n_rows, 1)
    x = _load(x_ref, mask, -jnp.inf, gpu)
    m, d = _load(m_ref, rows_in, 0.0, gpu), _load(d_ref, rows_in, 1.0, gpu)
    _store(o_ref, jnp.exp(x - m) / d, mask, gpu)


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


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret", "target"))
def _softmax_2d(x, *, block_m, block_n, interpret, target):
    n_rows, n_cols = x.shape
    grid = (pl.cdiv(n_rows, block_m), pl.cdiv(n_cols, block_n))
    tile = pl.BlockSpec((block_m, block_n), lambda i, j: (i, j))
    row_stat = pl.BlockSpec((block_m, 1), lambda i, j: (i, 0))  # same block for every j
    stat = jax.ShapeDtypeStruct((n_rows, 1), F32)
    size = dict(n_rows=n_rows, n_cols=n_cols)
    if target == "gpu":   # one program per row block walks its columns (module docstring)
        stats = pl.pallas_call(
            functools.partial(_stats_kernel_gpu, block_n=block_n, **size), grid=grid[:1],
            in_specs=[pl.BlockSpec((block_m, n_cols), lambda i: (i, 0))],
            out_specs=[pl.BlockSpec((block_m, 1), lambda i: (i, 0))] * 2,
            compiler_params=compiler_params(target, ("parallel",)),
            out_shape=[stat, stat], interpret=interpret, name="softmax_stats")
    else:                 # the column axis runs in order: m, d accumulate in VMEM
        stats = pl.pallas_call(
            functools.partial(_stats_kernel_tpu, **size), grid=grid, in_specs=[tile],
            out_specs=[row_stat, row_stat],
            compiler_params=compiler_params(target, ("parallel", "arbitrary")),
            out_shape=[stat, stat], interpret=interpret, name="softmax_stats")
    m, d = stats(x)
    return pl.pallas_call(
        functools.partial(_normalise_kernel, gpu=target == "gpu", **size), grid=grid,
        in_specs=[tile, row_stat, row_stat], out_specs=tile,
        compiler_params=compiler_params(target, ("parallel", "parallel")),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret,
        name="softmax_normalise")(x, m, d)


def softmax_pallas(x: jax.Array, axis: int = -1, *, block_size: int | None = None) -> jax.Array:
    """Softmax along `axis` with the online normaliser, in Pallas (interpret mode on CPU).

    x: float32, float16 or bfloat16, any shape; block_size: the column tile, a power of two
    >= 128 (default: the row length rounded up to a power of two, at most 2048).
    """
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
    target = pallas_target()
    check_gpu_blocks(target, block_m=block_m, block_n=block_n)
    out = _softmax_2d(rows, block_m=block_m, block_n=block_n, interpret=pallas_interpret(),
                      target=target)
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis)
