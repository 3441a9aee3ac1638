"""The MoE layer: a router, E SwiGLU experts, and a dispatch. [..., D] -> [..., D].

Drop-in for the tiny Llama's MLP (`Llama(config, ffn_factory=moe_factory(...))`). After each
forward the layer keeps what the lab measures: `aux_loss` (add it to the training loss; sum
over layers with `moe_aux_loss(model)`), `last_load` (assignments per expert) and
`last_dropped` (share of assignments dropped for lack of capacity) and `last_indices` [T, k].

Hash routing needs token ids the Llama blocks do not pass along: set them for one forward with
`with token_ids(model, tokens): model(tokens)`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from shared.moe.dispatch import (
    BACKENDS,
    capacity,
    einsum_dispatch,
    index_dispatch,
    sort_dispatch,
)
from shared.moe.routers import Router

DISPATCHES = ("einsum", "index", "sort")


class MoELayer(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, router: Router, *, dispatch: str = "sort",
                 capacity_factor: float | None = None, backend: str = "torch",
                 init_std: float = 0.02):
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if capacity_factor is not None:
            capacity(1, 1, 1, capacity_factor)   # validates: must be > 0
        if router.dim != dim:
            raise ValueError(f"router.dim={router.dim} does not match dim={dim}")
        E = router.num_experts
        self.dim, self.ffn_dim, self.num_experts = dim, ffn_dim, E
        self.router, self.dispatch, self.backend = router, dispatch, backend
        self.capacity_factor = capacity_factor
        # Expert weights in the grouped-matmul layout [E, K, N]; gate and up fused (Mixtral).
        self.w_gate_up = nn.Parameter(torch.randn(E, dim, 2 * ffn_dim) * init_std)
        self.w_down = nn.Parameter(torch.randn(E, ffn_dim, dim) * init_std)
        self.token_ids: torch.Tensor | None = None
        self.aux_loss = torch.zeros(())
        self.last_indices: torch.Tensor | None = None
        self.last_dropped = 0.0

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim}, got shape {tuple(x.shape)}")
        ids = token_ids if token_ids is not None else self.token_ids
        flat = x.reshape(-1, self.dim)                                    # [T, D]
        if ids is not None:
            if ids.numel() != flat.shape[0]:
                raise ValueError(f"token_ids has {ids.numel()} ids for {flat.shape[0]} tokens")
            ids = ids.reshape(-1)
        routing = self.router(flat, ids)
        if self.dispatch in ("einsum", "index"):
            fn = einsum_dispatch if self.dispatch == "einsum" else index_dispatch
            y, keep = fn(flat, routing.gates, routing.indices, self.w_gate_up, self.w_down,
                         self.capacity_factor)
        else:
            y, keep = sort_dispatch(flat, routing.gates, routing.indices, self.w_gate_up,
                                    self.w_down, self.backend, self.capacity_factor)
        self.last_dropped = 0.0 if keep is None else 1.0 - keep.float().mean().item()
        self.aux_loss = routing.aux_loss
        self.last_indices = routing.indices.detach()
        return y.view(x.shape)

    @property
    def last_load(self) -> torch.Tensor:
        """[E] int64: assignments routed to each expert in the last forward (before dropping)."""
        if self.last_indices is None:
            return torch.zeros(self.num_experts, dtype=torch.int64)
        return torch.bincount(self.last_indices.reshape(-1).cpu(), minlength=self.num_experts)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Σ over the model's MoE layers of their last forward's (weighted) balancing loss."""
    return sum((m.aux_loss for m in moe_layers(model)), torch.zeros(()))


@contextmanager
def token_ids(model: nn.Module, tokens: torch.Tensor):
    """Let every MoE layer of `model` see `tokens` [B, T] for the forwards inside the block."""
    layers = moe_layers(model)
    for m in layers:
        m.token_ids = tokens
    try:
        yield
    finally:
        for m in layers:
            m.token_ids = None
