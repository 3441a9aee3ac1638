"""Routers: which k experts each token goes to, with what gate weight, and what balances them.

Four ways to answer, one interface, `router(x [T, D], token_ids [T] | None) -> Routing`:
- TopKRouter: learned softmax top-k (Shazeer et al. 2017, Mixtral) + Switch's balancing loss.
- SwitchRouter: top-1 of the softmax, gate = the raw probability (Switch §2.1); the capacity
  factor that drops overflow lives with the dispatch (dispatch.py), as in the paper (§2.2).
- HashRouter: expert = a fixed hash of the token id; no parameters, no loss (Hash Layers §3).
- BiasBalancedRouter: DeepSeek-V3's auxiliary-loss-free balancing (§2.1.2): sigmoid affinities
  s, experts chosen by top-k of s + b, gates from s alone; after each step b_i moves by ∓γ when
  expert i was over/under-loaded. b steers the choice and never enters the output or gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.moe import load_balancing_loss, topk_route


@dataclass
class Routing:
    gates: torch.Tensor     # [T, k] gate weight of each chosen expert
    indices: torch.Tensor   # [T, k] int64 expert ids
    aux_loss: torch.Tensor  # scalar balancing loss (already weighted), 0 if the router has none
    # [T, E] float32 router probabilities behind aux_loss, or None (a router without the loss):
    # expert parallelism recomputes the loss from the *global* f and P (parallel/expert/layer.py)
    probs: torch.Tensor | None = None


def _check_k(k: int, num_experts: int) -> None:
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")


def _check_x(x: torch.Tensor, dim: int) -> None:
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x must be [T, {dim}] (tokens, dim), got shape {tuple(x.shape)}")


class Router(nn.Module):
    """Base: num_experts, k, and `after_step()` (called once per optimizer step; a no-op)."""

    def __init__(self, dim: int, num_experts: int, k: int):
        super().__init__()
        _check_k(k, num_experts)
        self.dim, self.num_experts, self.k = dim, num_experts, k

    def after_step(self) -> None:
        pass


class TopKRouter(Router):
    """Learned linear gate, softmax, top-k; aux loss = weight · N·Σ f_i P_i (Switch eq. 4)."""

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, renormalize: bool = True,
                 aux_weight: float = 0.01):
        super().__init__(dim, num_experts, k)
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * dim ** -0.5)  # [E, D]
        self.renormalize, self.aux_weight = renormalize, aux_weight

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        _check_x(x, self.dim)
        route = topk_route(x @ self.weight.t(), self.k, renormalize=self.renormalize)
        aux, probs = x.new_zeros(()), None
        if self.training and self.aux_weight:   # a training signal: skipped in eval
            aux = self.aux_weight * load_balancing_loss(route.probs, route.indices,
                                                        self.num_experts)
            probs = route.probs
        return Routing(route.gates.to(x.dtype), route.indices, aux, probs)


class SwitchRouter(TopKRouter):
    """Switch Transformer: k = 1 and the gate is p_i(x) itself (not renormalised to 1), so the
    router gets a gradient through the one expert it picked (Switch §2.1, eq. 2)."""

    def __init__(self, dim: int, num_experts: int, *, aux_weight: float = 0.01):
        super().__init__(dim, num_experts, 1, renormalize=False, aux_weight=aux_weight)


class HashRouter(Router):
    """expert(t) = h(token_id) mod E with a fixed multiplicative hash (Knuth's 2654435761):
    deterministic, no parameters, gate 1 (Roller et al. 2021, §3, "random hash")."""

    MULTIPLIER = 2654435761

    def __init__(self, dim: int, num_experts: int):
        super().__init__(dim, num_experts, 1)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        _check_x(x, self.dim)
        if token_ids is None:
            raise ValueError("token_ids are required by HashRouter (it hashes the token id)")
        if token_ids.shape != (x.shape[0],):
            raise ValueError(f"token_ids must be [T={x.shape[0]}], got {tuple(token_ids.shape)}")
        h = (token_ids.long() * self.MULTIPLIER) % 2**32          # fits int64: ids < 2^31
        indices = ((h >> 16) % self.num_experts)[:, None]         # high bits mix best
        gates = torch.ones(indices.shape, dtype=x.dtype, device=x.device)
        return Routing(gates, indices, x.new_zeros(()))


class BiasBalancedRouter(Router):
    """DeepSeek-V3 (§2.1.2, eq. 12-16): choose top-k of s + b, gate with s normalised over the
    chosen k; b is a buffer, not a parameter, updated by ±γ from the observed load."""

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, gamma: float = 1e-3):
        super().__init__(dim, num_experts, k)
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * dim ** -0.5)  # centroids e_i
        self.register_buffer("bias", torch.zeros(num_experts))
        # assignments per expert since the last step: counts, not shares, so that loads from
        # several forwards (micro-batches) or ranks (expert parallelism) add up exactly
        self.register_buffer("load", torch.zeros(num_experts))
        self.gamma = gamma

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        _check_x(x, self.dim)
        s = torch.sigmoid((x @ self.weight.t()).float())                  # [T, E] affinities
        indices = torch.topk(s.detach() + self.bias, self.k, dim=-1).indices  # b: choice only
        chosen = s.gather(1, indices)
        gates = chosen / chosen.sum(dim=-1, keepdim=True)
        if self.training:
            self.load += torch.bincount(indices.reshape(-1), minlength=self.num_experts)
        return Routing(gates.to(x.dtype), indices, x.new_zeros(()))

    @torch.no_grad()
    def after_step(self) -> None:
        """b_i -= γ·sign(load_i - mean load): overloaded experts get picked less next step.
        Under expert parallelism the load must be the global one: ExpertParallelMoE.after_step
        all-reduces it first, so every rank moves the same bias."""
        if self.load.sum() > 0:
            self.bias -= self.gamma * torch.sign(self.load - self.load.mean())
            self.load.zero_()
