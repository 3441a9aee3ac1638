"""Token permutation in Triton: gather tokens into per-expert groups, and the gated combine back.

permute:   x_sorted[i] = x[order[i] // k]                  (MegaBlocks §5.1 "permute")
unpermute: y[t] = Σ_j gates[t, j] · y_sorted[positions[t, j]]  (gather + weighted sum)

Both are row gathers, so neither needs atomics: the combine reads each token's k rows and sums
them in registers, which a scatter-add would do with k atomic writes per element. The sort that
produces `order` is torch's (routing.routing_map); these kernels move the D-wide rows.

Gradients: permute's is a combine with unit gates; unpermute's, w.r.t. y_sorted, is a permute
of dy scaled by the gates, and w.r.t. the gates, a row-wise dot <y_sorted[pos], dy>.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.device import new_output
from kernels.moe.routing import routing_map
from kernels.validate import check_same_device, check_tensor

BLOCK_ROWS, BLOCK_D = 32, 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def gather_rows_kernel(X, SRC, SCALE, OUT, R, D, stride_x, stride_o,
                       HAS_SCALE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[i] = scale[i] · x[src[i]] for a block of rows i and columns d."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = rows < R
    mask = r_ok[:, None] & (cols[None, :] < D)
    src = tl.load(SRC + rows, mask=r_ok, other=0).to(tl.int64)
    vals = tl.load(X + src[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_SCALE:
        vals = vals * tl.load(SCALE + rows, mask=r_ok, other=0.0)[:, None]
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_o + cols[None, :],
             vals.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def combine_rows_kernel(YS, POS, GATES, OUT, T, D, stride_y, stride_o,
                        K: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = Σ_j gates[t, j] · ys[pos[t, j]], accumulated in fp32."""
    toks = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = toks < T
    mask = t_ok[:, None] & (cols[None, :] < D)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        pos = tl.load(POS + toks * K + j, mask=t_ok, other=0).to(tl.int64)
        gate = tl.load(GATES + toks * K + j, mask=t_ok, other=0.0).to(tl.float32)
        rows = tl.load(YS + pos[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
        acc += gate[:, None] * rows.to(tl.float32)
    tl.store(OUT + toks.to(tl.int64)[:, None] * stride_o + cols[None, :],
             acc.to(OUT.dtype.element_ty), mask=mask)


def gather_rows(x: torch.Tensor, src: torch.Tensor, scale: torch.Tensor | None = None):
    """[R, D]: row i is scale[i] · x[src[i]] (src int64 [R], scale float [R] or None)."""
    x = x.contiguous()
    R, D = src.numel(), x.shape[1]
    out = new_output((R, D), x.dtype, x.device)
    grid = (triton.cdiv(R, BLOCK_ROWS), triton.cdiv(D, BLOCK_D))
    gather_rows_kernel[grid](x, src, scale if scale is not None else src, out, R, D,
                             x.stride(0), out.stride(0), HAS_SCALE=scale is not None,
                             BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=BLOCK_D)
    return out


def combine_rows(y_sorted: torch.Tensor, positions: torch.Tensor, gates: torch.Tensor):
    """[T, D]: row t is Σ_j gates[t, j] · y_sorted[positions[t, j]]."""
    y_sorted = y_sorted.contiguous()
    T, k = positions.shape
    D = y_sorted.shape[1]
    out = new_output((T, D), y_sorted.dtype, y_sorted.device)
    grid = (triton.cdiv(T, BLOCK_ROWS), triton.cdiv(D, BLOCK_D))
    combine_rows_kernel[grid](y_sorted, positions.contiguous(), gates.contiguous(), out, T, D,
                              y_sorted.stride(0), out.stride(0), K=k,
                              BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=BLOCK_D)
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, positions):
        ctx.save_for_backward(positions)
        return gather_rows(x, src)

    @staticmethod
    def backward(ctx, dxs):
        (positions,) = ctx.saved_tensors      # each token's k copies sum back into it
        ones = torch.ones(positions.shape, dtype=torch.float32, device=dxs.device)
        return combine_rows(dxs, positions, ones), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, positions, gates):
        ctx.save_for_backward(y_sorted, positions, gates)
        return combine_rows(y_sorted, positions, gates)

    @staticmethod
    def backward(ctx, dy):
        y_sorted, positions, gates = ctx.saved_tensors
        k = positions.shape[1]
        d_ys = d_gates = None
        if ctx.needs_input_grad[0]:  # row positions[t, j] receives gates[t, j] · dy[t]
            order = torch.empty_like(positions.reshape(-1))
            order[positions.reshape(-1)] = torch.arange(order.numel(), device=order.device)
            d_ys = gather_rows(dy, order // k, gates.reshape(-1)[order].float())
        if ctx.needs_input_grad[2]:
            picked = y_sorted[positions].float()                      # [T, k, D]
            d_gates = torch.einsum("tkd,td->tk", picked, dy.float()).to(gates.dtype)
        return d_ys, None, d_gates


def permute(x: torch.Tensor, expert_indices: torch.Tensor, num_experts: int):
    """x [T, D] -> (x_sorted [T·k, D], group_sizes [E], positions [T, k]); differentiable in x.

    Rows of expert e are contiguous, in token order; assignment (t, j) sits at positions[t, j].
    """
    check_tensor(x, "x", ndim=2, dtypes=DTYPES)
    check_tensor(expert_indices, "expert_indices", ndim=2, dtypes=(torch.int32, torch.int64))
    check_same_device(("x", x), ("expert_indices", expert_indices))
    if expert_indices.shape[0] != x.shape[0]:
        raise ValueError(f"expert_indices has {expert_indices.shape[0]} rows but x has "
                         f"{x.shape[0]} tokens")
    rmap = routing_map(expert_indices, num_experts)
    src = rmap.order // expert_indices.shape[1]
    return _Permute.apply(x, src, rmap.positions), rmap.group_sizes, rmap.positions


def unpermute(y_sorted: torch.Tensor, positions: torch.Tensor, gates: torch.Tensor):
    """y [T, D] = Σ_j gates[t, j] · y_sorted[positions[t, j]]; differentiable in y and gates."""
    check_tensor(y_sorted, "y_sorted", ndim=2, dtypes=DTYPES)
    check_tensor(positions, "positions", ndim=2, dtypes=(torch.int64,))
    check_tensor(gates, "gates", ndim=2, dtypes=DTYPES)
    check_same_device(("y_sorted", y_sorted), ("positions", positions), ("gates", gates))
    if gates.shape != positions.shape:
        raise ValueError(f"gates has shape {tuple(gates.shape)} but positions has "
                         f"{tuple(positions.shape)}")
    if positions.numel() != y_sorted.shape[0]:
        raise ValueError(f"positions index {positions.numel()} assignments but y_sorted has "
                         f"{y_sorted.shape[0]} rows")
    return _Unpermute.apply(y_sorted, positions, gates)
