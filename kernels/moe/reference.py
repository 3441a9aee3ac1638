"""The specification of the MoE data-movement and matmul kernels, written for clarity (torch).

On a CPU these loops over contiguous slices are also the sensible algorithm (one BLAS call per
expert, no padding), so the MoE layer's `backend="torch"` path runs them; they are autograd-aware
through plain torch ops.
"""

from __future__ import annotations

import torch

from kernels.moe._args import check_group_total, grouped_shape
from kernels.moe.routing import routing_map


def grouped_matmul_reference(x: torch.Tensor, w: torch.Tensor,
                             group_sizes: torch.Tensor) -> torch.Tensor:
    """out[rows of group g] = x[rows of group g] @ w[g]; rows past Σ group_sizes are 0.

    x: [M, K] with the rows of group 0 first, then group 1, ...; w: [E, K, N]; group_sizes: [E].
    Same contract as jax.lax.ragged_dot(x, w, group_sizes).
    """
    shape = grouped_shape(x, w, group_sizes)
    sizes = group_sizes.tolist()
    if min(sizes) < 0:
        raise ValueError(f"group_sizes must be non-negative, got {sizes}")
    check_group_total(sum(sizes), shape.m)
    parts, start = [], 0
    for g, size in enumerate(sizes):
        parts.append(x[start:start + size] @ w[g])       # [size, K] @ [K, N]
        start += size
    parts.append(x.new_zeros(shape.m - start, shape.n))  # rows that belong to no group
    return torch.cat(parts)


def permute_reference(x: torch.Tensor, expert_indices: torch.Tensor, num_experts: int):
    """x [T, D] -> (x_sorted [T·k, D], group_sizes [E], positions [T, k]).

    Row i of x_sorted is a copy of the token whose assignment sorts to i; assignment (t, j)
    lands at row positions[t, j]. Group g's rows are contiguous and in token order.
    """
    rmap = routing_map(expert_indices, num_experts)
    k = expert_indices.shape[1]
    return x.index_select(0, rmap.order // k), rmap.group_sizes, rmap.positions


def unpermute_reference(y_sorted: torch.Tensor, positions: torch.Tensor,
                        gates: torch.Tensor) -> torch.Tensor:
    """y [T, D] = Σ_j gates[t, j] · y_sorted[positions[t, j]]: the gated combine of k outputs."""
    picked = y_sorted.index_select(0, positions.reshape(-1)).view(*positions.shape, -1)
    return (picked * gates.to(picked.dtype).unsqueeze(-1)).sum(dim=1)   # [T, k, D] -> [T, D]
