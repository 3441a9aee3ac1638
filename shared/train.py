"""Training the tiny models: next-byte prediction on the stdlib corpus, seeded, with a loss curve.

One loop serves every model. With ``exit_layer=e`` the loss adds LayerSkip's early-exit term
(Elhoushi et al. 2024, "training using layer dropout & early exit loss"): the shared norm +
lm_head must also predict from block e's output, so the first e blocks alone can draft for the
whole model (self-speculation). LayerSkip also drops layers stochastically and ramps the exit
loss over time; one fixed exit keeps this small.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.data import batches
from shared.models.llama import Llama


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    exit_layer: int | None = None  # LayerSkip early exit: also train blocks[:exit_layer] -> head
    exit_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.seq_len <= 0:
            raise ValueError("steps, batch_size and seq_len must be positive")
        if self.warmup < 0 or self.lr <= 0:
            raise ValueError("warmup must be >= 0 and lr > 0")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # training loss per step, nats/byte
    val_loss: float = float("nan")  # full model on held-out text
    val_loss_exit: float | None = None  # early exit on held-out text
    seconds: float = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def loss_fn(model: Llama, x: torch.Tensor, y: torch.Tensor, exit_layer: int | None,
            exit_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(objective, early-exit loss or None): cross-entropy in nats per byte."""
    V = model.config.vocab_size
    if exit_layer is None:
        return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)), None
    logits, early = model.forward_with_exit(x, exit_layer)
    main = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    exit_loss = F.cross_entropy(early.reshape(-1, V), y.reshape(-1))
    return main + exit_weight * exit_loss, exit_loss


@torch.no_grad()
def evaluate(model: Llama, tokens: torch.Tensor, cfg: TrainConfig, n_batches: int = 8,
             n_layers: int | None = None) -> float:
    """Mean cross-entropy (nats/byte) over fixed random windows of `tokens`."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    it = batches(tokens, cfg.batch_size, cfg.seq_len, generator=gen)
    V = model.config.vocab_size
    total = 0.0
    for _ in range(n_batches):
        x, y = next(it)
        total += F.cross_entropy(model(x, n_layers=n_layers).reshape(-1, V), y.reshape(-1)).item()
    model.train(was_training)
    return total / n_batches


def train(model: Llama, train_tokens: torch.Tensor, val_tokens: torch.Tensor, cfg: TrainConfig,
          *, progress: bool = True, desc: str = "train") -> TrainResult:
    """AdamW with warm-up + cosine decay and gradient clipping; returns the loss curve."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    it = batches(train_tokens, cfg.batch_size, cfg.seq_len, generator=gen)
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = next(it)
        loss, exit_loss = loss_fn(model, x, y, cfg.exit_layer, cfg.exit_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        result.losses.append(loss.item() if exit_loss is None else (loss - cfg.exit_weight
                                                                   * exit_loss).item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    model.eval()
    result.seconds = time.perf_counter() - start
    result.val_loss = evaluate(model, val_tokens, cfg)
    if cfg.exit_layer is not None:
        result.val_loss_exit = evaluate(model, val_tokens, cfg, n_layers=cfg.exit_layer)
    return result
