"""Input checks and random draws shared by the Triton kernels and their references.

Both implementations take their randomness from the same draws (``uniforms``, made on the
logits' device), so with equally seeded generators they return the same tokens: the tests
compare them exactly.

Checks that read tensor values (ranges, distributions: `check_accept_inputs`) copy them to the
host; on a GPU each one stalls the host until the device catches up. Decoding
(shared/inference) asks for them only under KC_DEBUG=1. Checks of shapes, dtypes, devices and
generators read no tensor values and always run.
"""

from __future__ import annotations

import math

import torch

from kernels.device import INTERPRET
from kernels.validate import check_same_device, check_tensor

# bf16 only off the interpreter, which computes bf16 on the raw bits
# (docs/cpu-notes.md, "Triton's interpreter")
PROB_DTYPES = (torch.float32, torch.float16, torch.float64) + (() if INTERPRET else (
    torch.bfloat16,))
TOKEN_DTYPES = (torch.int32, torch.int64)


def check_generator(generator, device) -> None:
    """A generator must live on the device its draws are made on (a CPU generator cannot
    drive torch.rand on a GPU, and copying draws over would cost a transfer per token)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    want = torch.device(device)
    have = generator.device
    if have.type != want.type or (want.index is not None and have.index is not None
                                  and have.index != want.index):
        raise ValueError(f"generator is on {have} but the tensors it draws for are on {want}: "
                         f"create it with torch.Generator(device={str(want)!r})")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return float(temperature)


def check_logits(logits: torch.Tensor) -> None:
    check_tensor(logits, "logits", ndim=2, dtypes=PROB_DTYPES)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have a vocabulary of at least 1, got {tuple(logits.shape)}")


def check_distributions(probs: torch.Tensor, name: str, atol: float | None = None) -> None:
    """Every row of `probs` (last axis) is a distribution: no negatives or NaN, sums to 1."""
    if atol is None:
        atol = 1e-2 if probs.dtype == torch.float16 else 1e-3
    if not torch.isfinite(probs).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (probs < 0).any():
        raise ValueError(f"{name} has negative probabilities (min {probs.min().item():.3g})")
    sums = probs.double().sum(-1)
    worst = (sums - 1).abs().max().item()
    if worst > atol:
        raise ValueError(
            f"{name} rows must sum to 1 (within {atol}), found a row off by {worst:.3g}")


def check_accept_inputs(draft_tokens, draft_probs, target_probs) -> tuple[int, int, int]:
    """Shapes [B, γ], [B, γ, V], [B, γ+1, V]; ids in [0, V); distributions; returns (B, γ, V)."""
    check_tensor(draft_tokens, "draft_tokens", ndim=2, dtypes=TOKEN_DTYPES)
    check_tensor(draft_probs, "draft_probs", ndim=3, dtypes=PROB_DTYPES)
    check_tensor(target_probs, "target_probs", ndim=3, dtypes=PROB_DTYPES)
    check_same_device(("draft_tokens", draft_tokens), ("draft_probs", draft_probs),
                      ("target_probs", target_probs))
    B, gamma = draft_tokens.shape
    V = draft_probs.shape[2]
    if draft_probs.shape != (B, gamma, V):
        raise ValueError(f"draft_probs must have shape [B={B}, γ={gamma}, V], "
                         f"got {tuple(draft_probs.shape)}")
    if target_probs.shape != (B, gamma + 1, V):
        raise ValueError(f"target_probs must have shape [B={B}, γ+1={gamma + 1}, V={V}], "
                         f"got {tuple(target_probs.shape)}")
    if draft_tokens.min() < 0 or draft_tokens.max() >= V:
        raise ValueError(f"draft_tokens must be in [0, V={V}), got values "
                         f"{draft_tokens.min().item()}..{draft_tokens.max().item()}")
    check_distributions(draft_probs, "draft_probs")
    check_distributions(target_probs, "target_probs")
    q_of_drafted = draft_probs.gather(2, draft_tokens.long()[..., None])
    if (q_of_drafted <= 0).any():
        raise ValueError("draft_tokens holds a token its own draft_probs give probability 0: "
                         "the drafter cannot have sampled it")
    return B, gamma, V


def uniforms(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """U(0, 1) float32 draws on `device` (the only randomness either implementation uses)."""
    check_generator(generator, device)
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
