"""Expert parallelism: E experts split over W ranks, tokens moved by all-to-all (GShard §2.3).

The communication (an all-to-all that autograd can run backwards) is in `comm.py` beside this.

Each rank holds T_r tokens, a replica of the router, and E/W experts (rank r owns experts
[r·E/W, (r+1)·E/W)). One forward:
  1. route locally and sort the T_r·k assignments by expert, hence by owning rank;
  2. all-to-all the per-expert counts (W·E integers), then the rows (dispatch);
  3. regroup the received rows by local expert and run the grouped SwiGLU;
  4. undo the regrouping, all-to-all the rows back (combine), un-sort with the gates.
Autograd runs the same two all-to-alls in reverse. Expert gradients come out complete on their
owner; the replicated router's gradients are partial sums, so `allreduce_router_grads` adds
them up, after which every number equals the single-process layer's on all W·T_r tokens.

Balancing is global too, as in the single process. The Switch loss N·Σ f_i·P_i is a product of
two *global* means (f over all W·T_r·k assignments, P over all W·T_r tokens), not a sum of
per-rank losses: one all-reduce of the counts and probability sums gives both, and each rank
backpropagates its own tokens' share of P. DeepSeek-V3's bias moves by the sign of the global
load: `after_step` all-reduces the router's counts before the update, so all ranks keep one bias.

Per rank and per all-to-all, rows leaving the rank: Σ_{r'≠r} rows for r'; under uniform
routing that is (W−1)/W · T_r·k rows of D elements (`a2a_bytes_formula`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.moe import (
    grouped_matmul,
    grouped_matmul_torch,
    permute_reference,
    unpermute_reference,
)
from shared.moe.layer import MoELayer
from shared.parallel.expert.comm import all_to_all


class ExpertParallelMoE(nn.Module):
    """This rank's share of a MoELayer (dropless sort dispatch). x [T_r, D] -> [T_r, D]."""

    def __init__(self, layer: MoELayer, group=None, backend: str = "torch"):
        super().__init__()
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        E = layer.num_experts
        if E % self.world:
            raise ValueError(f"num_experts={E} must be a multiple of the world size {self.world}")
        self.num_experts, self.local = E, E // self.world
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        self.router = layer.router                                        # replicated
        self.w_gate_up = nn.Parameter(layer.w_gate_up.detach()[lo:hi].clone())  # [E/W, D, 2F]
        self.w_down = nn.Parameter(layer.w_down.detach()[lo:hi].clone())         # [E/W, F, D]
        self.gmm = grouped_matmul if backend == "triton" else grouped_matmul_torch
        self.sent_rows = 0  # rows this rank sent to other ranks in the last dispatch
        self.aux_loss = torch.zeros(())  # as MoELayer.aux_loss: the global balancing loss

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        W, El = self.world, self.local
        routing = self.router(x, token_ids)
        xs, sizes, positions = permute_reference(x, routing.indices, self.num_experts)
        self.aux_loss = self._global_aux_loss(routing, sizes)
        # 1. counts: recv[s, e] = rows rank s sends to my local expert e
        recv = torch.empty_like(sizes)
        dist.all_to_all_single(recv, sizes, group=self.group)
        recv = recv.view(W, El)
        send_splits = sizes.view(W, El).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        self.sent_rows = sum(send_splits) - send_splits[self.rank]
        # 2. dispatch: rows arrive ordered (source rank, local expert)
        xr = all_to_all(xs, recv_splits, send_splits, self.group)        # [R, D]
        # 3. regroup by local expert (stable: source order kept within an expert)
        local_ids = torch.arange(El, device=x.device).repeat(W)          # [W·El], (s, e) order
        expert_of_row = local_ids.repeat_interleave(recv.reshape(-1))
        order = torch.argsort(expert_of_row, stable=True)
        gate, up = self.gmm(xr[order], self.w_gate_up, recv.sum(0)).chunk(2, dim=-1)
        yl = self.gmm((F.silu(gate) * up).contiguous(), self.w_down, recv.sum(0))
        yr = yl[torch.argsort(order)]                                    # back to arrival order
        # 4. combine: rows return to their senders, then the gated un-sort
        ys = all_to_all(yr, send_splits, recv_splits, self.group)        # [T_r·k, D]
        return unpermute_reference(ys, positions, routing.gates)

    def _global_aux_loss(self, routing, sizes: torch.Tensor) -> torch.Tensor:
        """N·Σ f_i·P_i over all ranks' tokens. Value: the global loss on every rank; gradient:
        this rank's share (its tokens' part of P), so the summed router gradients are the
        single process's."""
        if routing.probs is None:          # no balancing loss (eval, or a router without one)
            return routing.aux_loss
        E, k = self.num_experts, routing.indices.shape[1]
        p_sum = routing.probs.sum(0)                                      # [E] this rank's Σ_t p
        tokens_here = p_sum.new_full((1,), routing.probs.shape[0])
        stats = torch.cat([sizes.float(), p_sum.detach(), tokens_here])  # one all-reduce
        dist.all_reduce(stats, group=self.group)                          # Σ over ranks
        counts, p_all, tokens = stats[:E], stats[E:2 * E], stats[2 * E]
        f = counts / (tokens * k)                                         # global shares
        weight = self.router.aux_weight * E
        mine = weight * torch.sum(f * p_sum) / tokens                     # differentiable part
        total = weight * torch.sum(f * p_all) / tokens
        return mine + (total - mine).detach()

    @torch.no_grad()
    def after_step(self) -> None:
        """The router's per-step update (DeepSeek-V3's bias) from the global load."""
        load = getattr(self.router, "load", None)
        if isinstance(load, torch.Tensor):
            dist.all_reduce(load, group=self.group)
        self.router.after_step()


def allreduce_router_grads(module: ExpertParallelMoE) -> None:
    """Sum the replicated router's gradients over ranks (each rank saw only its tokens)."""
    for p in module.router.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=module.group)
