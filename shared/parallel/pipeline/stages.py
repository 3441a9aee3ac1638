"""Cut the shared Llama into pipeline stages, and (optionally) pin each stage's time.

A stage is ``embed -> layers[a:b]`` on the first, ``layers[a:b]`` in the middle, and
``layers[a:b] -> norm -> lm_head`` on the last (the loss is the runtime's business, so that
torch.distributed.pipelining can run the very same module with its own loss_fn).

Emulated durations (`Slots`): on a 2-core machine four ranks cannot all compute at once, so
measured bubbles would mix the schedule with CPU contention. With slots set, a stage runs its
real computation and then sleeps until its forward has lasted ``f`` seconds and its backward
``backward`` seconds: the arithmetic is real, only the durations are pinned (sleeping ranks
leave the cores to the working ones). Unset on a GPU, where each rank owns its device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from shared.models.llama import Llama


@dataclass
class Slots:
    """Durations in seconds: forward, backward for the input (b) and for the weights (w).
    `backward` is what the next backward pass is held to; the runtime sets it to b + w for a
    fused backward and b for the input half (its W it pads itself). The slot counts from
    `t_backward`: the caller's action start if it sets one, else the stage's first backward
    node (torch.distributed.pipelining's case)."""

    f: float
    b: float
    w: float
    backward: float = 0.0
    t_backward: float | None = None

    def __post_init__(self) -> None:
        self.backward = self.b + self.w


def sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)


class _BackwardStarts(torch.autograd.Function):
    """Identity on the stage output; its backward is the first of the stage's: the backward
    starts now, unless the caller said when it started."""

    @staticmethod
    def forward(ctx, x, slots):
        ctx.slots = slots
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.slots.t_backward is None:
            ctx.slots.t_backward = time.perf_counter()
        return g, None


class _BackwardEnds(torch.autograd.Function):
    """Identity on the stage input; its backward is the last: wait out the backward slot."""

    @staticmethod
    def forward(ctx, x, slots):
        ctx.slots = slots
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        sleep_until(ctx.slots.t_backward + ctx.slots.backward)
        ctx.slots.t_backward = None
        return g, None


class Stage(nn.Module):
    """One (virtual) pipeline stage of a Llama: x [B, T] tokens or [B, T, D] hidden ->
    [B, T, D] hidden, or [B, T, V] logits on the last stage."""

    def __init__(self, layers: list[nn.Module], *, embed: nn.Module | None = None,
                 norm: nn.Module | None = None, lm_head: nn.Module | None = None,
                 slots: Slots | None = None):
        super().__init__()
        self.embed, self.norm, self.lm_head = embed, norm, lm_head
        self.layers = nn.ModuleList(layers)
        self.slots = slots

    def run(self, x: torch.Tensor, *, pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tensor whose gradient goes upstream, the output). On the first stage that
        tensor is the embedding output: the B half of the backward stops there.
        pad=False leaves the forward's slot to the caller (who has more to do inside it)."""
        t0 = time.perf_counter()
        h = self.embed(x) if self.embed is not None else x
        inp = h
        if self.slots is not None:
            h = _BackwardEnds.apply(h, self.slots)
        for layer in self.layers:
            h = layer(h)
        if self.lm_head is not None:
            h = self.lm_head(self.norm(h))
        if self.slots is not None:
            h = _BackwardStarts.apply(h, self.slots)
            if pad:
                sleep_until(t0 + self.slots.f)
        return inp, h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[1]


def layer_ranges(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Split n_layers as evenly as possible: the first n_layers % n_stages stages get one more."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into {n_stages} stages "
                         f"(each stage needs at least one layer)")
    q, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + q + (s < extra))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def split_llama(model: Llama, n_stages: int, *, slots: Slots | None = None) -> list[Stage]:
    """Virtual stages 0..n_stages-1 of `model`, sharing its parameters (no copies), so
    gradients accumulate into the model's own .grad and compare name for name."""
    ranges = layer_ranges(len(model.layers), n_stages)
    last = n_stages - 1
    return [Stage([model.layers[i] for i in range(a, b)],
                  embed=model.embed if s == 0 else None,
                  norm=model.norm if s == last else None,
                  lm_head=model.lm_head if s == last else None, slots=slots)
            for s, (a, b) in enumerate(ranges)]
