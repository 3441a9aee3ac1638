"""The lab's training experiment: the tiny Llama with MoE layers, one run per router.

Every run trains the same model (shared/models/llama.py with each block's MLP replaced through
`ffn_factory`) on the stdlib corpus, with the same seed, batches and capacity factor, so what
differs is only how tokens are routed. Dropping uses the sort dispatch with GShard's rule: the
same numbers as the one-hot einsum (tests/test_moe_layer.py checks it) at a sixth of its CPU
time. Per step it logs the language-model loss, the load imbalance max_i load_i / mean load
(averaged over layers; 1 = perfectly balanced) and the share of assignments dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from shared.data import batches
from shared.models.llama import Llama, LlamaConfig
from shared.moe.dispatch import capacity, capacity_slots
from shared.moe.layer import MoELayer, moe_aux_loss, moe_layers, token_ids
from shared.moe.routers import BiasBalancedRouter, HashRouter, SwitchRouter, TopKRouter
from shared.train import TrainConfig, lr_at

ROUTERS = ("top-2 + Switch loss", "top-2, no loss", "Switch top-1", "hash", "DeepSeek-V3 bias")
# Routers compared at matched k: the learned ones at k = 2 against the unbalanced top-2; hash
# (always one expert per token) against Switch's learned top-1.
TOP2 = ("top-2, no loss", "top-2 + Switch loss", "DeepSeek-V3 bias")
TOP1 = ("Switch top-1", "hash")


@dataclass(frozen=True)
class MoERun:
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 64
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    experts: int = 8
    expert_ffn: int = 64
    capacity_factor: float | None = 1.25   # Switch's training setting (§2.2, Table 1)
    aux_weight: float = 0.01               # Switch's α (§2.2)
    # DeepSeek-V3 moves its bias by γ = 0.001 per step over trillions of tokens; a run of a few
    # hundred steps needs a faster update to balance at all.
    bias_gamma: float = 0.01
    lr: float = 3e-3
    seed: int = 0


def make_router(kind: str, run: MoERun):
    d, e = run.dim, run.experts
    routers = {
        "top-2 + Switch loss": lambda: TopKRouter(d, e, 2, aux_weight=run.aux_weight),
        "top-2, no loss": lambda: TopKRouter(d, e, 2, aux_weight=0.0),
        "Switch top-1": lambda: SwitchRouter(d, e, aux_weight=run.aux_weight),
        "hash": lambda: HashRouter(d, e),
        "DeepSeek-V3 bias": lambda: BiasBalancedRouter(d, e, 2, gamma=run.bias_gamma),
    }
    if kind not in routers:
        raise ValueError(f"router kind must be one of {sorted(routers)}, got {kind!r}")
    return routers[kind]()


def moe_model(kind: str, run: MoERun, dispatch: str = "sort") -> Llama:
    """Tiny Llama whose every block's MLP is a MoE layer routed by `kind`."""
    torch.manual_seed(run.seed)
    config = LlamaConfig(vocab_size=256, dim=run.dim, n_layers=run.n_layers,
                         n_heads=run.n_heads, n_kv_heads=run.n_heads, ffn_dim=run.expert_ffn,
                         max_seq_len=run.seq_len)
    return Llama(config, ffn_factory=lambda c, i: MoELayer(
        c.dim, run.expert_ffn, make_router(kind, run), dispatch=dispatch,
        capacity_factor=run.capacity_factor))


@dataclass
class History:
    kind: str
    loss: list[float] = field(default_factory=list)        # LM cross-entropy, nats/byte
    imbalance: list[float] = field(default_factory=list)   # max/mean expert load
    dropped: list[float] = field(default_factory=list)     # share of assignments dropped
    val_loss: float = float("nan")
    seconds: float = 0.0


def _step_stats(model: Llama) -> tuple[float, float]:
    layers = moe_layers(model)
    imb = [float(m.last_load.max() / m.last_load.float().mean()) for m in layers]
    return sum(imb) / len(imb), sum(m.last_dropped for m in layers) / len(layers)


def lm_loss(model: Llama, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with token_ids(model, x):   # the hash router reads the ids
        logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_moe(kind: str, run: MoERun, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
              dispatch: str = "sort") -> tuple[Llama, History]:
    """AdamW, warm-up + cosine (shared.train.lr_at), loss = LM + Σ layers' balancing losses."""
    model = moe_model(kind, run, dispatch)
    sched = TrainConfig(steps=run.steps, lr=run.lr, warmup=run.steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, betas=(0.9, 0.95), weight_decay=0.0)
    data = batches(train_tokens, run.batch_size, run.seq_len,
                   generator=torch.Generator().manual_seed(run.seed))
    hist = History(kind)
    start = time.perf_counter()
    model.train()
    for step in range(run.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, sched)
        x, y = next(data)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        (loss + moe_aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for m in moe_layers(model):
            m.router.after_step()            # DeepSeek-V3's bias update; a no-op otherwise
        imb, drop = _step_stats(model)
        hist.loss.append(loss.item())
        hist.imbalance.append(imb)
        hist.dropped.append(drop)
    hist.seconds = time.perf_counter() - start
    hist.val_loss = evaluate(model, val_tokens, run)
    return model, hist


@torch.no_grad()
def evaluate(model: Llama, tokens: torch.Tensor, run: MoERun, n_batches: int = 4) -> float:
    model.eval()
    data = batches(tokens, run.batch_size, run.seq_len,
                   generator=torch.Generator().manual_seed(run.seed + 1))
    total = sum(lm_loss(model, *next(data)).item() for _ in range(n_batches))
    return total / n_batches


@torch.no_grad()
def dropped_vs_capacity(model: Llama, tokens: torch.Tensor, run: MoERun,
                        factors: list[float]) -> dict[float, float]:
    """Share of assignments a trained model's routers would drop at each capacity factor, on a
    held-out batch (routing does not depend on the factor; only the dropping does)."""
    model.eval()
    data = batches(tokens, run.batch_size, run.seq_len,
                   generator=torch.Generator().manual_seed(run.seed + 2))
    x, _ = next(data)
    with token_ids(model, x):
        model(x)
    routed = [m.last_indices for m in moe_layers(model)]        # [T, k] per layer
    out = {}
    for cf in factors:
        drops = []
        for idx in routed:
            T, k = idx.shape
            _, keep = capacity_slots(idx, run.experts, capacity(T, k, run.experts, cf))
            drops.append(1.0 - keep.float().mean().item())
        out[cf] = sum(drops) / len(drops)
    return out


def train_seeds(kinds, run: MoERun, seeds, train_tokens: torch.Tensor,
                val_tokens: torch.Tensor) -> dict[str, list[tuple[Llama, History]]]:
    """Every router in `kinds` trained once per seed (initial weights and batch order)."""
    return {kind: [train_moe(kind, replace(run, seed=s), train_tokens, val_tokens)
                   for s in seeds] for kind in kinds}


# Student's t, two-sided 95%, by degrees of freedom (a few seeds; no scipy needed)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262}


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean over seeds."""
    v = [float(x) for x in values]
    if not 2 <= len(v) <= 10:
        raise ValueError(f"values must hold 2 to 10 seeds, got {len(v)}")
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    half = _T95[len(v) - 1] * sd / math.sqrt(len(v))
    return mean, mean - half, mean + half
