"""Argument checks shared by the Triton, Pallas and reference MoE kernels: one place, one message.

Only `.shape` and `.dtype` are read, so the checks serve torch tensors and JAX arrays alike;
torch-only checks (type, device) live in kernels.validate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupedShape:
    """x: [M, K] rows grouped by expert; w: [E, K, N]; group_sizes: [E]; out: [M, N]."""

    m: int
    k: int
    n: int
    groups: int


def grouped_shape(x, w, group_sizes) -> GroupedShape:
    """Validate the operands of grouped_matmul (jax.lax.ragged_dot's layout) and return sizes."""
    if len(x.shape) != 2:
        raise ValueError(f"x must have 2 dimensions [M, K], got shape {tuple(x.shape)}")
    if len(w.shape) != 3:
        raise ValueError(f"w must have 3 dimensions [E, K, N], got shape {tuple(w.shape)}")
    if len(group_sizes.shape) != 1:
        raise ValueError(f"group_sizes must have 1 dimension [E], got shape "
                         f"{tuple(group_sizes.shape)}")
    m, k = x.shape
    groups, wk, n = w.shape
    if wk != k:
        raise ValueError(f"w has K={wk} but x has K={k} (x [M, K] @ w [E, K, N])")
    if group_sizes.shape[0] != groups:
        raise ValueError(f"group_sizes has {group_sizes.shape[0]} entries but w has "
                         f"E={groups} experts")
    if "int" not in str(group_sizes.dtype):
        raise TypeError(f"group_sizes must be an integer array, got {group_sizes.dtype}")
    if str(x.dtype) != str(w.dtype):
        raise TypeError(f"w has dtype {w.dtype} but x has {x.dtype}")
    if min(k, n, groups) == 0:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)} must have K, N, E > 0")
    return GroupedShape(m, k, n, groups)


def check_group_total(total: int, m: int) -> None:
    """Group sizes are non-negative and cover at most the M rows (rows past them give 0)."""
    if total > m:
        raise ValueError(f"group_sizes sum to {total} but x has only M={m} rows")


def check_routing(expert_indices, num_experts: int, tokens: int | None = None) -> None:
    """expert_indices: [T, k] integer expert ids in [0, num_experts)."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if len(expert_indices.shape) != 2:
        raise ValueError(f"expert_indices must have 2 dimensions [T, k], got shape "
                         f"{tuple(expert_indices.shape)}")
    if "int" not in str(expert_indices.dtype):
        raise TypeError(f"expert_indices must be integer, got {expert_indices.dtype}")
    if tokens is not None and expert_indices.shape[0] != tokens:
        raise ValueError(f"expert_indices has {expert_indices.shape[0]} rows but x has "
                         f"{tokens} tokens")
    if expert_indices.shape[1] > num_experts:
        raise ValueError(f"k={expert_indices.shape[1]} experts per token exceeds "
                         f"num_experts={num_experts}")
