"""Router math shared by every MoE layer: top-k gating, the sort that groups tokens by expert,
and the Switch load-balancing loss.

Shapes: T tokens, E experts, k experts per token. An *assignment* is one (token, choice) pair,
numbered a = t·k + j; there are T·k of them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.moe._args import check_routing
from kernels.validate import check_tensor


class Route(NamedTuple):
    gates: torch.Tensor    # [T, k] weight of each chosen expert in the token's output
    indices: torch.Tensor  # [T, k] int64 expert ids, best first
    probs: torch.Tensor    # [T, E] float32 router probabilities (for the balancing loss)


def topk_route(logits: torch.Tensor, k: int, *, renormalize: bool = False) -> Route:
    """Softmax over experts, then the k most probable (Shazeer et al. 2017; Switch §2.1).

    renormalize=True rescales the k gates to sum to 1 (Mixtral); Switch (k=1) keeps the raw
    probability p_i(x) so the gate still carries the router's confidence (Switch eq. 2).
    """
    check_tensor(logits, "logits", ndim=2, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    E = logits.shape[1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, num_experts={E}], got {k!r}")
    probs = torch.softmax(logits.float(), dim=-1)   # router math in fp32, as the paper (§2.4)
    gates, indices = torch.topk(probs, k, dim=-1)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return Route(gates, indices, probs)


class RoutingMap(NamedTuple):
    order: torch.Tensor        # [T·k] assignment id a = t·k + j sitting in sorted row i
    positions: torch.Tensor    # [T, k] sorted row of assignment (t, j): order's inverse
    group_sizes: torch.Tensor  # [E] int64 rows per expert; rows of expert e are contiguous


def routing_map(expert_indices: torch.Tensor, num_experts: int) -> RoutingMap:
    """Sort the T·k assignments by expert (stable, so token order is kept inside a group).

    This is MegaBlocks' "permute" bookkeeping (Gale et al. 2023, §5.1): after it, every expert
    reads one contiguous block of rows, so a grouped matmul needs no padding and drops nothing.
    """
    check_routing(expert_indices, num_experts)
    flat = expert_indices.reshape(-1)
    if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < num_experts:
        raise ValueError(f"expert_indices must lie in [0, num_experts={num_experts})")
    order = torch.argsort(flat, stable=True)
    positions = torch.empty_like(order)
    positions[order] = torch.arange(order.numel(), device=order.device)
    group_sizes = torch.bincount(flat, minlength=num_experts)
    return RoutingMap(order, positions.view(expert_indices.shape), group_sizes)


def expert_load(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] float: share f_i of the T·k assignments sent to expert i (sums to 1)."""
    check_routing(expert_indices, num_experts)
    counts = torch.bincount(expert_indices.reshape(-1), minlength=num_experts)
    return counts.float() / max(1, expert_indices.numel())


def load_balancing_loss(router_probs: torch.Tensor, expert_indices: torch.Tensor,
                        num_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss N · Σ_i f_i · P_i (Switch eq. 4-6), a scalar.

    f_i: share of the T·k assignments routed to expert i (not differentiable: counts).
    P_i: mean router probability of expert i over the T tokens (carries the gradient).
    Σ f_i = Σ P_i = 1, so at uniform routing (f_i = P_i = 1/N) the loss is exactly 1 for any k;
    dividing f by T·k rather than T is what keeps that true for k > 1. When the router's
    probabilities follow its choices (P = f) the loss is N·Σ f_i², which is > 1 unless balanced.
    """
    check_tensor(router_probs, "router_probs", ndim=2)
    check_routing(expert_indices, num_experts, tokens=router_probs.shape[0])
    if router_probs.shape[1] != num_experts:
        raise ValueError(f"router_probs has {router_probs.shape[1]} experts, expected "
                         f"num_experts={num_experts}")
    f = expert_load(expert_indices, num_experts).to(router_probs.device)
    P = router_probs.float().mean(dim=0)
    return num_experts * torch.sum(f * P)
