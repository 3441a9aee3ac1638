"""Grouped matmul in Pallas (JAX): jax.lax.ragged_dot's contract, laid out for a TPU.

A TPU block must sit on the (tm, tn) grid of the array, so, unlike the Triton kernel, tiles
cannot start at group offsets. Instead the grid walks *visits* (group, m-tile) in order: a tile
that straddles a group boundary is visited once per group, each visit writing only its group's
rows (a row mask), and the output block stays resident while the same tile is revisited on
consecutive steps. The visit list is computed in jnp and handed to the kernel as
scalar-prefetch operands, so the BlockSpec index maps can read it (the design of MegaBlocks'
TPU port; Gale et al. 2023 §5). Its length has the static bound cdiv(M, tm) + E.

Backward (a custom_vjp, since jax.grad cannot see through pallas_call): dx = grouped(dy, wᵀ)
with the same kernel, dw[g] = x[rows of g]ᵀ · dy[rows of g] with a second kernel whose output
block (one expert's [K, tn]) accumulates over that expert's visits. K is kept whole in a block.

TPU only. Both kernels carry an output block from one visit to the next, so the visit axis is
"arbitrary" (in order, on one core) and the column axis "parallel" (kernels/tpu_lowering.py).
Pallas's GPU (Triton) lowering has neither scalar prefetch nor ordered grid axes, so on a GPU
this function refuses to run: use `grouped_matmul` (Triton) or jax.lax.ragged_dot there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.device import pallas_interpret
from kernels.moe._args import grouped_shape
from kernels.tpu_lowering import compiler_params, pad_to_multiple, require_tpu

# grid (column tiles, visits): a tile's or an expert's output block is revisited in order
_SEMANTICS = ("parallel", "arbitrary")


@dataclass(frozen=True)
class PallasBlocks:
    """TPU tiling rules, asserted here because interpret mode does not check them."""

    m: int = 128  # rows per tile: a multiple of 8 (sublanes)
    n: int = 128  # output columns per tile: a multiple of 128 (lanes)

    def __post_init__(self) -> None:
        if self.m <= 0 or self.m % 8:
            raise ValueError(f"PallasBlocks.m={self.m} must be a positive multiple of 8")
        if self.n <= 0 or self.n % 128:
            raise ValueError(f"PallasBlocks.n={self.n} must be a positive multiple of 128")


def visit_schedule(group_sizes, m: int, tm: int, *, visit_empty: bool):
    """(group, m_tile, valid) per visit [cdiv(m, tm) + E] int32, and offsets [G + 1].

    visit_empty: give every group at least one visit (the dw kernel must write zeros for an
    expert with no rows). Steps past the last real visit repeat it with valid = 0 (a no-op).
    """
    num_tiles = pl.cdiv(m, tm)
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = jnp.minimum(starts // tm, num_tiles - 1)
    last = jnp.where(sizes > 0, (ends - 1) // tm, first)
    visits = jnp.where(sizes > 0, last - first + 1, 1 if visit_empty else 0)
    visits_end = jnp.cumsum(visits)
    total = visits_end[-1]
    v = jnp.arange(num_tiles + sizes.shape[0], dtype=jnp.int32)
    v = jnp.minimum(v, total - 1)                 # padding steps repeat the last real visit
    g = jnp.searchsorted(visits_end, v, side="right").astype(jnp.int32)
    tile = first[g] + v - (visits_end[g] - visits[g])
    valid = (jnp.arange(v.shape[0]) < total).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), ends])
    return g, tile.astype(jnp.int32), valid, offsets


def _rows_in_group(g, tile, offsets, valid, tm):
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)   # [tm, 1]
    return (rows >= offsets[g]) & (rows < offsets[g + 1]) & (valid == 1)


def _gmm_kernel(gids, tiles, offsets, valid, x_ref, w_ref, o_ref, *, tm, num_groups):
    v = pl.program_id(1)
    g, tile = gids[v], tiles[v]

    @pl.when((v == 0) | (tiles[jnp.maximum(v - 1, 0)] != tile))
    def _first_visit_of_tile():
        o_ref[...] = jnp.zeros_like(o_ref)

    mine = _rows_in_group(g, tile, offsets, valid[v], tm) & (g < num_groups)
    prod = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)  # [tm, tn]
    o_ref[...] = jnp.where(mine, prod.astype(o_ref.dtype), o_ref[...])


def _dw_kernel(gids, tiles, offsets, valid, x_ref, dy_ref, dw_ref, *, tm):
    v = pl.program_id(1)
    g, tile = gids[v], tiles[v]

    @pl.when((v == 0) | (gids[jnp.maximum(v - 1, 0)] != g))
    def _first_visit_of_group():
        dw_ref[...] = jnp.zeros_like(dw_ref)

    mine = _rows_in_group(g, tile, offsets, valid[v], tm)
    x = jnp.where(mine, x_ref[...], 0)                                       # [tm, K]
    dw_ref[...] += jnp.dot(x.T, dy_ref[...], preferred_element_type=jnp.float32)


def _gmm(x, w, group_sizes, blocks: PallasBlocks):
    M, K = x.shape
    E, _, N = w.shape
    tm, tn = blocks.m, blocks.n
    sizes = jnp.concatenate([group_sizes.astype(jnp.int32),            # group E: rows past
                             jnp.maximum(M - group_sizes.sum(), 0)[None].astype(jnp.int32)])
    gids, tiles, valid, offsets = visit_schedule(sizes, M, tm, visit_empty=False)
    xp, wp = pad_to_multiple(x, 0, tm), pad_to_multiple(w, 2, tn)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(wp.shape[2] // tn, gids.shape[0]),
        in_specs=[
            pl.BlockSpec((tm, K), lambda n, v, gids, tiles, *_: (tiles[v], 0)),
            pl.BlockSpec((None, K, tn),
                         lambda n, v, gids, tiles, *_: (jnp.minimum(gids[v], E - 1), 0, n)),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda n, v, gids, tiles, *_: (tiles[v], n)),
    )
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, num_groups=E),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], wp.shape[2]), x.dtype),
        interpret=pallas_interpret(), compiler_params=compiler_params("tpu", _SEMANTICS),
    )(gids, tiles, offsets, valid, xp, wp)
    return out[:M, :N]


def _dw(x, dy, group_sizes, blocks: PallasBlocks):
    M, K = x.shape
    N = dy.shape[1]
    E = group_sizes.shape[0]
    tm, tn = blocks.m, blocks.n
    gids, tiles, valid, offsets = visit_schedule(group_sizes, M, tm, visit_empty=True)
    xp, dyp = pad_to_multiple(x, 0, tm), pad_to_multiple(pad_to_multiple(dy, 0, tm), 1, tn)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(dyp.shape[1] // tn, gids.shape[0]),
        in_specs=[
            pl.BlockSpec((tm, K), lambda n, v, gids, tiles, *_: (tiles[v], 0)),
            pl.BlockSpec((tm, tn), lambda n, v, gids, tiles, *_: (tiles[v], n)),
        ],
        out_specs=pl.BlockSpec((None, K, tn), lambda n, v, gids, tiles, *_: (gids[v], 0, n)),
    )
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, tm=tm),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((E, K, dyp.shape[1]), jnp.float32),  # fp32 accumulator
        interpret=pallas_interpret(), compiler_params=compiler_params("tpu", _SEMANTICS),
    )(gids, tiles, offsets, valid, xp, dyp)
    return dw[:, :, :N].astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(x, w, group_sizes, blocks):
    return _gmm(x, w, group_sizes, blocks)


def _grouped_fwd(x, w, group_sizes, blocks):
    return _gmm(x, w, group_sizes, blocks), (x, w, group_sizes)


def _grouped_bwd(blocks, res, dy):
    x, w, group_sizes = res
    dx = _gmm(dy, jnp.swapaxes(w, 1, 2), group_sizes, blocks)
    dw = _dw(x, dy, group_sizes, blocks)
    return dx, dw, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


@functools.partial(jax.jit, static_argnames=("blocks",))
def _grouped_jit(x, w, group_sizes, blocks):
    return _grouped(x, w, group_sizes, blocks)


def grouped_matmul_pallas(x, w, group_sizes, *, blocks: PallasBlocks | None = None):
    """x [M, K] (rows grouped by expert), w [E, K, N], group_sizes [E] -> [M, N] (jax arrays).

    Same contract as jax.lax.ragged_dot; differentiable in x and w (custom_vjp, Pallas backward).
    Group sizes must be non-negative and sum to at most M (checked when they are concrete).
    """
    require_tpu("grouped_matmul_pallas", "kernels.moe.grouped_matmul or jax.lax.ragged_dot")
    shape = grouped_shape(x, w, group_sizes)
    if not isinstance(group_sizes, jax.core.Tracer):
        # numpy, not jnp: under an enclosing jit, jnp on a concrete constant returns a tracer
        sizes = np.asarray(group_sizes)
        if sizes.min() < 0 or sizes.sum() > shape.m:
            raise ValueError(f"group_sizes must be non-negative and sum to at most M={shape.m}, "
                             f"got {sizes.tolist()}")
    return _grouped_jit(x, w, group_sizes, blocks or PallasBlocks())
