"""The communication of expert parallelism: a differentiable all-to-all, and its volume.

Dispatch sends each row to the rank that owns its expert; combine sends it back. The gradient of
an all-to-all is the all-to-all with the splits swapped, so autograd runs the same routes in
reverse (GShard §2.3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Rows of x go out in in_splits-sized chunks (chunk r to rank r); out_splits come back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, dout):
        out_splits, in_splits = ctx.splits   # the gradient travels the same routes backwards
        dx = dout.new_empty((sum(in_splits), *dout.shape[1:]))
        dist.all_to_all_single(dx, dout.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None):
    return _AllToAll.apply(x, out_splits, in_splits, group)


def a2a_bytes_formula(tokens: int, k: int, dim: int, world: int, itemsize: int) -> float:
    """Expected bytes one rank sends to others in one all-to-all under uniform routing."""
    return (world - 1) / world * tokens * k * dim * itemsize
