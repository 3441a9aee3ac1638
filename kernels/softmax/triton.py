"""Softmax in Triton: the paper's online normalizer (Algorithm 3) and the safe softmax it beats.

Milakov & Gimelshein, "Online normalizer calculation for softmax" (arXiv 1805.02867).
A row of length N is read in tiles of BLOCK_N. Per element of global memory:

    safe softmax (Alg. 2)   pass 1 max, pass 2 Σexp, pass 3 normalise   3 loads + 1 store = 4
    online softmax (Alg. 3) pass 1 max and Σexp together, pass 2 write  2 loads + 1 store = 3

The online pass keeps a running max m and a running sum d and rescales d whenever m grows:
    m' = max(m, max_j x_j),   d' = d·exp(m − m') + Σ_j exp(x_j − m')          (Algorithm 3)
Softmax is memory bound, so 4/3 fewer accesses predict a speed-up of up to 1.33×.
When a whole row fits in one tile, both kernels take the same path (`_one_tile`): the row is
loaded once and kept in registers, 2 accesses per element, so the algorithms differ only on rows
longer than a tile, the regime the paper is about.
A tile is BLOCK_M rows × BLOCK_N columns; each program walks row blocks pid, pid + P, ... (P
programs), with NUM_STAGES blocks' loads in flight. How big the tiles are, how many warps and
programs, is one heuristic for both kernels: kernels/softmax/tiling.py says what and why.
ALIGN tells the compiler that row starts and the row length are multiples of ALIGN elements:
Triton only knows that of integers divisible by 16, and without it a row of 1000 fp16 values
compiles to 2-byte loads instead of 16-byte vector loads (seen in the PTX; the lab shows it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.device import INTERPRET, new_output
from kernels.launch import grid as launch_grid
from kernels.launch import offset
from kernels.softmax.tiling import Tiling, choose, sm_count
from kernels.validate import FLOAT_DTYPES, check_dim, check_tensor


@triton.jit
def _rescaled_exp(x, m):
    """exp(x − m), with exp(−inf − (−inf)) taken as 0 instead of NaN (a row still all −inf)."""
    return tl.where(m == float("-inf"), 0.0, tl.exp(x - m))


@triton.jit
def _normalise(x_rows, out_rows, cols, row_ok, n_cols, m, d, BLOCK_N: tl.constexpr):
    """The last sweep of both algorithms: read x again, write exp(x − m) / d (1 load, 1 store).
    A row that is all −inf gives 0/0 = NaN, as torch does."""
    for start in range(0, n_cols, BLOCK_N):
        mask = row_ok & (start + cols < n_cols)
        x = tl.load(x_rows + start + cols, mask=mask, other=float("-inf"))
        y = tl.exp(x.to(tl.float32) - m) / d
        tl.store(out_rows + start + cols, y.to(out_rows.dtype.element_ty), mask=mask)


@triton.jit
def _one_tile(x_rows, out_rows, cols, row_ok, n_cols):
    """The row fits one tile: load it once, keep it in registers, 1 load and 1 store per element.
    Max, Σexp and normalise all read the registers, so safe and online are the same here."""
    mask = row_ok & (cols < n_cols)
    x = tl.load(x_rows + cols, mask=mask, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=1, keep_dims=True)
    e = tl.exp(x - m)
    y = e / tl.sum(e, axis=1, keep_dims=True)
    tl.store(out_rows + cols, y.to(out_rows.dtype.element_ty), mask=mask)


@triton.jit
def _aligned(n_cols, stride_x, stride_out, ALIGN: tl.constexpr):
    """The launcher's promise that these are multiples of ALIGN, made visible to the compiler:
    n // ALIGN * ALIGN is n itself, but its divisibility is now known, so loads are vectorised.
    (tl.multiple_of on a scalar argument is dropped by Triton 3.9: checked in the TTIR.)"""
    return n_cols // ALIGN * ALIGN, stride_x // ALIGN * ALIGN, stride_out // ALIGN * ALIGN


@triton.jit
def _row_block(x_ptr, out_ptr, block, n_rows, stride_x, stride_out,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row starts of row block `block` ([BLOCK_M, 1], int64 offsets), the columns of one tile
    ([1, BLOCK_N]) and which rows exist."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    return (x_ptr + offset(rows, stride_x), out_ptr + offset(rows, stride_out), cols,
            rows < n_rows)


@triton.jit
def softmax_online_kernel(x_ptr, out_ptr, n_rows, n_cols, stride_x, stride_out,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          ONE_TILE: tl.constexpr, ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr):
    n_cols, stride_x, stride_out = _aligned(n_cols, stride_x, stride_out, ALIGN)
    for block in tl.range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0),
                          num_stages=NUM_STAGES):
        x_rows, out_rows, cols, row_ok = _row_block(x_ptr, out_ptr, block, n_rows, stride_x,
                                                    stride_out, BLOCK_M, BLOCK_N)
        if ONE_TILE:
            _one_tile(x_rows, out_rows, cols, row_ok, n_cols)
        else:
            # Pass 1 (Alg. 3, lines 1-6): running max m and running normaliser d in one sweep.
            m = tl.full([BLOCK_M, 1], float("-inf"), tl.float32)
            d = tl.zeros([BLOCK_M, 1], tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                mask = row_ok & (start + cols < n_cols)
                x = tl.load(x_rows + start + cols, mask=mask, other=float("-inf"))
                x = x.to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=1, keep_dims=True))
                d = d * _rescaled_exp(m, m_new) + tl.sum(_rescaled_exp(x, m_new), axis=1,
                                                         keep_dims=True)
                m = m_new
            # Pass 2 (lines 7-9): y_i = exp(x_i − m) / d.
            _normalise(x_rows, out_rows, cols, row_ok, n_cols, m, d, BLOCK_N)


@triton.jit
def softmax_safe_kernel(x_ptr, out_ptr, n_rows, n_cols, stride_x, stride_out,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        ONE_TILE: tl.constexpr, ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Algorithm 2, the baseline: three sweeps over the row (max, Σexp, normalise); a row that
    fits one tile takes the same register-resident path as the online kernel."""
    n_cols, stride_x, stride_out = _aligned(n_cols, stride_x, stride_out, ALIGN)
    for block in tl.range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0),
                          num_stages=NUM_STAGES):
        x_rows, out_rows, cols, row_ok = _row_block(x_ptr, out_ptr, block, n_rows, stride_x,
                                                    stride_out, BLOCK_M, BLOCK_N)
        if ONE_TILE:
            _one_tile(x_rows, out_rows, cols, row_ok, n_cols)
        else:
            m = tl.full([BLOCK_M, 1], float("-inf"), tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                mask = row_ok & (start + cols < n_cols)
                x = tl.load(x_rows + start + cols, mask=mask, other=float("-inf"))
                m = tl.maximum(m, tl.max(x.to(tl.float32), axis=1, keep_dims=True))
            d = tl.zeros([BLOCK_M, 1], tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                mask = row_ok & (start + cols < n_cols)
                x = tl.load(x_rows + start + cols, mask=mask, other=float("-inf"))
                d += tl.sum(_rescaled_exp(x.to(tl.float32), m), axis=1, keep_dims=True)
            _normalise(x_rows, out_rows, cols, row_ok, n_cols, m, d, BLOCK_N)


def _alignment(element_size: int, *lengths: int) -> int:
    """The largest power of two, up to one 16-byte vector of elements, dividing every length
    (row length and strides, in elements): what ALIGN may promise the compiler."""
    align = 16 // element_size
    while align > 1 and any(n % align for n in lengths):
        align //= 2
    return align


def _as_rows(x: torch.Tensor, dim: int, name: str = "x") -> tuple[torch.Tensor, int]:
    """Validate x and view it as [rows, cols] with the softmax dim last and contiguous."""
    check_tensor(x, name, dtypes=FLOAT_DTYPES)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    if INTERPRET and x.dtype == torch.bfloat16:
        raise TypeError(f"{name}: bfloat16 is computed wrongly by Triton's interpreter; "
                        "use float32 or float16 without a GPU")
    dim = check_dim(dim, x.ndim)
    moved = x.movedim(dim, -1).contiguous()
    return moved.reshape(-1, moved.shape[-1]), dim


def _tiling(rows: torch.Tensor, block_size: int | None, tiling: Tiling | None) -> Tiling:
    if tiling is None:
        return choose(*rows.shape, rows.element_size(), block_size, sm_count(rows.device))
    if not isinstance(tiling, Tiling):
        raise TypeError(f"tiling must be a kernels.softmax.tiling.Tiling, got "
                        f"{type(tiling).__name__}")
    if block_size is not None:
        raise ValueError("give block_size or tiling, not both (tiling.block_n is the tile width)")
    return tiling.check()


def _launch(kernel, x: torch.Tensor, dim: int, block_size: int | None,
            tiling: Tiling | None) -> torch.Tensor:
    rows, dim = _as_rows(x, dim)
    n_rows, n_cols = rows.shape
    t = _tiling(rows, block_size, tiling)
    out = new_output(rows.shape, rows.dtype, rows.device)
    kernel[launch_grid(t.programs)](
        rows, out, n_rows, n_cols, rows.stride(0), out.stride(0),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, ONE_TILE=n_cols <= t.block_n,
        ALIGN=_alignment(rows.element_size(), n_cols, rows.stride(0), out.stride(0)),
        NUM_STAGES=t.num_stages, num_warps=t.num_warps)
    shape = x.movedim(dim, -1).shape
    return out.reshape(shape).movedim(-1, dim)


class _Softmax(torch.autograd.Function):
    """Forward by the online kernel; backward dx = y ⊙ (dy − Σ dy ⊙ y), in torch."""

    @staticmethod
    def forward(ctx, x, dim, block_size, tiling):
        y = _launch(softmax_online_kernel, x, dim, block_size, tiling)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return y * (dy - (dy * y).sum(ctx.dim, keepdim=True)), None, None, None


def softmax(x: torch.Tensor, dim: int = -1, *, block_size: int | None = None,
            tiling: Tiling | None = None) -> torch.Tensor:
    """Softmax along `dim` with the online normaliser. Rows longer than the tile (by default
    rows over 4096 columns, in tiles of 1024; `block_size` sets the tile width) are swept with
    the running max and sum. `tiling` replaces the heuristic's whole launch (tests, benchmarks).
    Differentiable; without a gradient to record it skips autograd's bookkeeping, so it pays the
    same host time per call as safe_softmax."""
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        return _Softmax.apply(x, dim, block_size, tiling)
    return _launch(softmax_online_kernel, x, dim, block_size, tiling)


def safe_softmax(x: torch.Tensor, dim: int = -1, *, block_size: int | None = None,
                 tiling: Tiling | None = None) -> torch.Tensor:
    """The three-pass safe softmax (Algorithm 2) that the paper improves on; same tiling."""
    return _launch(softmax_safe_kernel, x, dim, block_size, tiling)
