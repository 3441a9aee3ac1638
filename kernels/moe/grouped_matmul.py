"""Grouped matmul in Triton: every expert's GEMM in ONE launch (MegaBlocks §5; ragged_dot).

x [M, K] holds the tokens sorted by expert, group g owning rows [off_g, off_g + size_g);
out[rows of g] = x[rows of g] @ w[g]. A per-expert loop would launch E GEMMs, most of them tiny
and each paying a launch; padding every group to a capacity (GShard) wastes FLOPs and bytes on
zeros. Here one grid covers all experts: a *tile schedule* lists, for each BLOCK_M-row tile, the
group it belongs to and its row range. Tiles start at group offsets, so a tile never mixes
experts; the last tile of a group is partial and masked.

The schedule is built with a handful of torch ops on the device (cumsum, searchsorted), without
reading the sizes back to the host: the grid is the static bound cdiv(M, BLOCK_M) + E (each of
the E+1 groups, the rows past Σ sizes included, adds at most one partial tile), and tiles past
the real ones are empty. Backward: dx = grouped(dy, wᵀ) reuses the forward kernel through
strides; dw[g] = x[rows of g]ᵀ · dy[rows of g] is a second kernel that walks each group's rows.

Speed (the first H200 run: 102–117 TFLOP/s against torch's grouped_mm at 467–490). Tiles are
chosen per target (`default_blocks`): on sm_90 128 × 128 × 64 with 8 warps and 3 stages, so
tl.dot becomes Hopper's wgmma (M = 128 feeds two warpgroups) and each loaded byte serves 128
rows or columns, where the old 64 × 64 × 32 on 4 warps ran mma.sync. The forward programs run
in a grouped order (Triton's matmul tutorial): GROUP_M row tiles sweep every column tile before
the next rows start, so a row tile of x is read from HBM about once instead of once per column
tile (N / BLOCK_N times: 11 at N = 1408), the column tiles of w[g] being reused from L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.device import INTERPRET, capability, new_output
from kernels.moe._args import check_group_total, grouped_shape
from kernels.validate import check_same_device, check_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes, and how the programs run them. GPU rules: powers of two, tl.dot's K
    (block_k, and block_m in the dw kernel, where the rows are the reduction) at least 16.
    group_m: row tiles per group of the forward's program order; warps, stages: num_warps and
    num_stages of both kernels."""

    m: int = 64
    n: int = 64
    k: int = 32
    group_m: int = 8
    warps: int = 4
    stages: int = 3

    def __post_init__(self) -> None:
        for name in ("m", "n", "k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"Blocks.{name}={v} must be a power of two >= 16")
        for name in ("group_m", "warps", "stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 2**16:
                raise ValueError(f"Blocks.{name}={v!r} must be an int in 1..65536 (group_m "
                                 "times the column tiles is an int32 in the kernel)")


def default_blocks(dtype: torch.dtype) -> Blocks:
    """The tiles for this target (kernels.device.capability(), the compile target inside
    `kclub compile`): the largest no-spill configs found by compiling for sm_80 and sm_90
    (shared/compile_report.py's moe cases). fp32 keeps 64 × 64 tiles: its operands are twice
    the bytes and, on a GPU, TF32. The interpreter takes the defaults, cheap to run."""
    cap = capability()
    if cap >= 90 and dtype != torch.float32:
        return Blocks(m=128, n=128, k=64, warps=8, stages=3)
    if cap >= 80 and dtype != torch.float32:
        return Blocks(m=128, n=128, k=32, warps=8, stages=3)
    return Blocks()


@triton.jit
def grouped_matmul_kernel(
    X, W, OUT, TILE_START, TILE_END, TILE_GROUP,  # x [M, K], w [E, K, N], out [M, N]
    K, N, num_groups, num_tiles,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped order: programs walk GROUP_M row tiles down each column tile, then the next
    # column tile, and only then the next GROUP_M row tiles (the last group may be shorter).
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * col_tiles
    first = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(num_tiles - first, GROUP_M)
    tile = first + (pid % per_group) % rows_here
    col_tile = (pid % per_group) // rows_here
    row_start = tl.load(TILE_START + tile)
    row_end = tl.load(TILE_END + tile)             # start == end: an empty (padding) tile
    g = tl.load(TILE_GROUP + tile)                 # g == num_groups: rows of no expert -> 0
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = (W + g.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk
              + cols[None, :] * stride_wn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(g < num_groups, K, 0)        # no weights to read for the zero tiles
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = k0 + offs_k < K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = OUT + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_matmul_dw_kernel(
    X, DY, DW, OFFSETS,  # x [M, K], dy [M, N], dw [E, K, N], offsets [E + 1]
    K, N,
    stride_xm, stride_xk, stride_dm, stride_dn, stride_we, stride_wk, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    col_ok = cols < N
    start = tl.load(OFFSETS + g)
    end = tl.load(OFFSETS + g + 1)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)   # an empty group writes zeros
    for r0 in range(start, end, BLOCK_M):                  # the group's rows, BLOCK_M at a time
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        r_ok = rows < end
        xt = tl.load(X + rows[None, :] * stride_xm + ks[:, None] * stride_xk,
                     mask=k_ok[:, None] & r_ok[None, :], other=0.0)          # [BK, BM] = xᵀ
        dy = tl.load(DY + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0)        # [BM, BN]
        acc = tl.dot(xt, dy, acc)
    dw_ptrs = (DW + g.to(tl.int64) * stride_we + ks[:, None] * stride_wk
               + cols[None, :] * stride_wn)                  # E·K·N may pass 2^31
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


def group_offsets(group_sizes: torch.Tensor) -> torch.Tensor:
    """[E + 1] int64: offsets[g] is the first row of group g; offsets[E] = Σ sizes."""
    zero = group_sizes.new_zeros(1, dtype=torch.int64)
    return torch.cat([zero, torch.cumsum(group_sizes.to(torch.int64), 0)])


def tile_schedule(group_sizes: torch.Tensor, m: int, block_m: int):
    """(start, end, group) per tile, int32 [cdiv(m, block_m) + E], computed on the device.

    Group E stands for the rows past Σ sizes (written as zeros, as ragged_dot does); tiles past
    the last real one are empty (start = end) and also carry group E.
    """
    E = group_sizes.numel()
    sizes = group_sizes.to(torch.int64)
    tail = (m - sizes.sum()).clamp(min=0).reshape(1)
    sizes = torch.cat([sizes, tail])                          # [E + 1]
    ends = torch.cumsum(sizes, 0)
    tiles = (sizes + block_m - 1) // block_m                  # tiles per group
    tiles_end = torch.cumsum(tiles, 0)
    t = torch.arange(triton.cdiv(m, block_m) + E, device=group_sizes.device)
    g = torch.searchsorted(tiles_end, t, right=True)          # group of tile t; E + 1 = none
    gc = g.clamp(max=E)
    start = ends[gc] - sizes[gc] + (t - tiles_end[gc] + tiles[gc]) * block_m
    end = torch.minimum(start + block_m, ends[gc])
    empty = g > E
    start = torch.where(empty, 0, start)
    end = torch.where(empty, 0, end)
    return start.to(torch.int32), end.to(torch.int32), gc.to(torch.int32)


def _check(x, w, group_sizes):
    dtypes = DTYPES[:2] if INTERPRET else DTYPES  # the interpreter computes bf16 wrongly
    check_tensor(x, "x", ndim=2, dtypes=dtypes, nonempty=False)  # M = 0: a rank with no tokens
    check_tensor(w, "w", ndim=3, dtypes=dtypes)
    check_tensor(group_sizes, "group_sizes", ndim=1, dtypes=(torch.int32, torch.int64))
    check_same_device(("x", x), ("w", w), ("group_sizes", group_sizes))
    shape = grouped_shape(x, w, group_sizes)
    # One host read (min and sum together): bad sizes would make the kernel read out of bounds.
    smallest, total = torch.stack([group_sizes.min(), group_sizes.sum()]).tolist()
    if smallest < 0:
        raise ValueError(f"group_sizes must be non-negative, got {group_sizes.tolist()}")
    check_group_total(total, shape.m)
    return shape


def _forward(x, w, group_sizes, blocks: Blocks) -> torch.Tensor:
    M, K = x.shape
    E, _, N = w.shape
    out = new_output((M, N), x.dtype, x.device)
    if M == 0:
        return out
    start, end, group = tile_schedule(group_sizes, M, blocks.m)
    grid = (start.numel() * triton.cdiv(N, blocks.n),)
    grouped_matmul_kernel[grid](
        x, w, out, start, end, group, K, N, E, start.numel(),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, GROUP_M=blocks.group_m,
        num_warps=blocks.warps, num_stages=blocks.stages)
    return out


def _weight_grad(x, dy, group_sizes, blocks: Blocks) -> torch.Tensor:
    """dw [E, K, N], dw[g] = x[rows of g]ᵀ @ dy[rows of g] (MegaBlocks' "tgmm")."""
    E = group_sizes.numel()
    K, N = x.shape[1], dy.shape[1]
    dw = new_output((E, K, N), x.dtype, x.device)
    offsets = group_offsets(group_sizes)
    grid = (E, triton.cdiv(K, blocks.k), triton.cdiv(N, blocks.n))
    grouped_matmul_dw_kernel[grid](
        x, dy, dw, offsets, K, N,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        num_warps=blocks.warps, num_stages=blocks.stages)
    return dw


class _GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, group_sizes, blocks):
        ctx.save_for_backward(x, w, group_sizes)
        ctx.blocks = blocks
        return _forward(x, w, group_sizes, blocks)

    @staticmethod
    def backward(ctx, dy):
        x, w, group_sizes = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx = dy @ w[g]ᵀ per group: the forward kernel on wᵀ
            dx = _forward(dy, w.transpose(1, 2), group_sizes, ctx.blocks)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(x, dy, group_sizes, ctx.blocks)
        return dx, dw, None, None


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, *,
                   blocks: Blocks | None = None) -> torch.Tensor:
    """x [M, K] (rows grouped by expert), w [E, K, N], group_sizes [E] (zeros allowed) -> [M, N].
    blocks: the tiles (default: `default_blocks` for this target and x's dtype).

    jax.lax.ragged_dot's contract: rows past Σ group_sizes come out as 0. Differentiable in x
    and w, with Triton kernels for both gradients.
    """
    _check(x, w, group_sizes)
    return _GroupedMatmul.apply(x, w, group_sizes, blocks or default_blocks(x.dtype))
