"""The model every data-parallel job trains: the tiny Llama with its input embedding tied to
the output head, and one frozen parameter, so ZeRO's bookkeeping meets both.

Units are what ZeRO-3 gathers and frees one at a time (and what DDP buckets): one per
transformer block, plus the root: the tied embedding/head and the final norm, gathered for
the whole step (used first and last, as FSDP keeps its root unit unsharded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.llama import Llama, LlamaConfig

FROZEN = "layers.0.attn_norm.weight"  # the frozen parameter: no gradient, no optimizer state


@dataclass(frozen=True)
class ModelSpec:
    config: LlamaConfig
    seq_len: int
    seed: int = 0


def build_model(spec: ModelSpec) -> Llama:
    """The same model on every rank (same seed): head tied to the embedding, FROZEN frozen."""
    if spec.seq_len > spec.config.max_seq_len:
        raise ValueError(f"seq_len={spec.seq_len} exceeds max_seq_len={spec.config.max_seq_len}")
    torch.manual_seed(spec.seed)
    model = Llama(spec.config)
    model.lm_head.weight = model.embed.weight  # one Parameter used twice: grads add up
    frozen = model.get_parameter(FROZEN)
    with torch.no_grad():  # not all ones, so a frozen value that moved would show
        frozen.copy_(1 + 0.1 * torch.randn_like(frozen))
    frozen.requires_grad_(False)
    return model


def units(model: Llama) -> list[tuple[str, list[nn.Parameter]]]:
    """(name, trainable parameters) per unit: "root" first, then "layers.i" in forward order.
    model.parameters() yields a tied parameter once, so the head adds nothing to the root."""
    root = [p for n, p in model.named_parameters() if not n.startswith("layers.")
            and p.requires_grad]
    blocks = [(f"layers.{i}", [p for p in block.parameters() if p.requires_grad])
              for i, block in enumerate(model.layers)]
    return [("root", root), *blocks]


def trainable_numel(model: nn.Module) -> int:
    """Ψ: the number of distinct trainable parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def loss_fn(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch, computed in fp32."""
    logits = model(tokens)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def batch(spec: ModelSpec, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: `size` random token windows, seeded by (seed, step), so
    every rank and the single-process reference draw the same one; ranks take their rows."""
    g = torch.Generator().manual_seed(1000 * spec.seed + step)
    window = torch.randint(0, spec.config.vocab_size, (size, spec.seq_len + 1), generator=g)
    return window[:, :-1], window[:, 1:]
