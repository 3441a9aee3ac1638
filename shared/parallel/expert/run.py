"""Run the expert-parallel layer on W ranks and compare it with one process.

`launch(cfg, world)` starts W processes through `shared.parallel.launch.spawn` (torchrun's
environment variables, a port picked at run time, a deadline, the first failing rank's error
raised in the parent). Every rank builds the same layer and the same global batch from the seed,
runs its token shard through ExpertParallelMoE, backpropagates a fixed upstream gradient plus
the balancing loss, all-reduces the router gradients, takes the router's per-step update, and
returns what it got; `single_process` computes the same numbers in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.moe.layer import MoELayer
from shared.moe.routers import BiasBalancedRouter, TopKRouter
from shared.parallel.expert.layer import ExpertParallelMoE, allreduce_router_grads
from shared.parallel.launch import spawn

GRADS = ("w_gate_up", "w_down")


@dataclass(frozen=True)
class EPConfig:
    experts: int = 8
    k: int = 2
    dim: int = 32
    ffn: int = 48
    tokens: int = 24        # per rank
    seed: int = 0
    router: str = "topk"    # "topk": learned top-k + Switch loss; "bias": DeepSeek-V3's bias
    aux_weight: float = 1.0  # large, so a wrong (per-rank) loss shows in the router gradient
    fail_rank: int = -1     # a rank that raises on purpose (to prove failures end the run)


def build_layer(cfg: EPConfig) -> MoELayer:
    """The full single-process layer, identical on every rank (seeded)."""
    if cfg.router not in ("topk", "bias"):
        raise ValueError(f"router must be 'topk' or 'bias', got {cfg.router!r}")
    torch.manual_seed(cfg.seed)
    if cfg.router == "topk":
        router = TopKRouter(cfg.dim, cfg.experts, cfg.k, aux_weight=cfg.aux_weight)
    else:
        router = BiasBalancedRouter(cfg.dim, cfg.experts, cfg.k, gamma=0.01)
        with torch.no_grad():     # a favourite expert, so the first bias step is not all zeros
            router.weight[0] += 1.0
    return MoELayer(cfg.dim, cfg.ffn, router, init_std=0.2)


def make_batch(cfg: EPConfig, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) for all world · tokens tokens: rank r owns rows [r·tokens, (r+1)·tokens)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(world * cfg.tokens, cfg.dim, generator=gen)
    dy = torch.randn(world * cfg.tokens, cfg.dim, generator=gen)
    return x, dy


def single_process(cfg: EPConfig, world: int) -> dict[str, torch.Tensor]:
    """The reference: the whole batch through one MoELayer, same upstream gradient."""
    layer = build_layer(cfg)
    x, dy = make_batch(cfg, world)
    x.requires_grad_(True)
    y = layer(x)
    ((y * dy).sum() + layer.aux_loss).backward()
    layer.router.after_step()
    return {"y": y.detach(), "dx": x.grad, "router": layer.router.weight.grad,
            **{g: getattr(layer, g).grad for g in GRADS}, **_balance(layer)}


def _balance(layer) -> dict[str, torch.Tensor]:
    """The balancing state a step leaves: the loss value, and the bias (zeros without one)."""
    bias = getattr(layer.router, "bias", torch.zeros(layer.num_experts))
    return {"aux": layer.aux_loss.detach().reshape(1), "bias": bias.clone()}


def rank_main(cfg: EPConfig) -> dict:
    """One rank's share (runs inside the process group that `spawn` or torchrun set up)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == cfg.fail_rank:
        raise RuntimeError(f"rank {rank} fails on purpose (fail_rank={cfg.fail_rank})")
    ep = ExpertParallelMoE(build_layer(cfg))
    x_all, dy_all = make_batch(cfg, world)
    rows = slice(rank * cfg.tokens, (rank + 1) * cfg.tokens)
    x = x_all[rows].clone().requires_grad_(True)
    y = ep(x)
    ((y * dy_all[rows]).sum() + ep.aux_loss).backward()
    allreduce_router_grads(ep)
    local_load = getattr(ep.router, "load", torch.zeros(0)).clone()   # before the all-reduce
    ep.after_step()
    return {"y": y.detach(), "dx": x.grad, "router": ep.router.weight.grad,
            **{g: getattr(ep, g).grad for g in GRADS}, **_balance(ep),
            "local_load": local_load, "sent_rows": ep.sent_rows, "itemsize": x.element_size()}


def launch(cfg: EPConfig, world: int = 4, timeout: float = 180.0) -> list[dict]:
    """Each rank's results, in rank order; a failed rank raises RuntimeError with its error."""
    return spawn(rank_main, world, cfg, timeout_s=timeout)


def gather_results(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """Stitch the ranks' shards into single-process shapes (router grads are already summed;
    the balancing loss and the bias are global: rank 0's, which the tests compare across ranks)."""
    return {"y": torch.cat([r["y"] for r in ranks]), "dx": torch.cat([r["dx"] for r in ranks]),
            "router": ranks[0]["router"], "aux": ranks[0]["aux"], "bias": ranks[0]["bias"],
            **{g: torch.cat([r[g] for r in ranks]) for g in GRADS}}
