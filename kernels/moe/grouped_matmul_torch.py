"""Grouped matmul on torch's own grouped GEMM (torch.nn.functional.grouped_mm): the CPU path.

On a machine without a GPU the Triton kernel runs in the interpreter, which is for proving,
not for timing. The same algorithm — one call for all experts over ragged row groups, no
padding — is what torch ships as a native CPU kernel, so that is what the MoE layer's
backend="torch" runs and what the lab times on a CPU. Autograd is ours (torch's formula fails
on empty groups on the CPU): dx = grouped(dy, wᵀ); dw = grouped_mm(xᵀ, dy), torch's 2-D × 2-D
form, which splits the shared M dimension by the same offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.moe._args import check_group_total, grouped_shape


def _gmm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    out = F.grouped_mm(x, w, offs=offsets)
    if total < out.shape[0]:
        out[total:] = 0             # grouped_mm leaves rows past the last offset unwritten
    return out


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, total):
        ctx.save_for_backward(x, w, offsets)
        ctx.total = total
        return _gmm(x, w, offsets, total)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _gmm(dy, w.transpose(1, 2), offsets, ctx.total)
        if ctx.needs_input_grad[1]:
            dw = F.grouped_mm(x.t(), dy, offs=offsets)           # [E, K, N]
        return dx, dw, None, None


def grouped_matmul_torch(x: torch.Tensor, w: torch.Tensor,
                         group_sizes: torch.Tensor) -> torch.Tensor:
    """Same contract as grouped_matmul / jax.lax.ragged_dot, on torch's grouped GEMM."""
    shape = grouped_shape(x, w, group_sizes)
    if int(group_sizes.min()) < 0:
        raise ValueError(f"group_sizes must be non-negative, got {group_sizes.tolist()}")
    offsets = torch.cumsum(group_sizes, 0).to(torch.int32)
    total = int(offsets[-1])
    check_group_total(total, shape.m)
    return _GroupedMM.apply(x.contiguous(), w, offsets, total)
