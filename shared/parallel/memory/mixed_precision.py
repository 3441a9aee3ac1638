"""Mixed-precision training (Micikevicius et al., ICLR 2018): fp16 or bf16 compute, fp32 master
weights, and dynamic loss scaling.

§3.1: the model's weights, activations and gradients are 16-bit; an fp32 master copy of each
weight takes the update (a 16-bit weight would lose updates smaller than its ulp).
§3.2: fp16 gradients underflow, so the loss is multiplied by S before the backward and the
gradients divided by S before the update. Dynamic S: if any gradient is inf/NaN the step is
skipped and S halved; after N clean steps in a row S doubles (torch.amp.GradScaler's rule,
which `LossScaler` follows so the two can be compared step by step). bf16 has fp32's exponent
range and needs no scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LossScaler:
    """Dynamic loss scale S: `unscale_` divides gradients by S and says whether any is
    non-finite; `update(found_inf)` halves S on overflow, else counts the clean step and
    multiplies S by `growth_factor` after `growth_interval` of them."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        if not growth_factor > 1 or not 0 < backoff_factor < 1:
            raise ValueError(f"need growth_factor > 1 and 0 < backoff_factor < 1, got "
                             f"{growth_factor=} {backoff_factor=}")
        if not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def unscale_(self, grads: list[torch.Tensor]) -> bool:
        """grads /= S in place (fp32 masters' gradients); True if any is inf or NaN."""
        inv = torch.tensor(1.0 / self.scale, dtype=torch.float32)  # S is a power of 2: exact
        found = False
        for g in grads:
            g.mul_(inv)
            found = found or not bool(torch.isfinite(g).all())
        return found

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0


@dataclass(frozen=True)
class Step:
    loss: float        # the unscaled loss, fp32
    scale: float       # S used for this step's backward
    skipped: bool      # an inf/NaN gradient: no update


class MixedPrecision:
    """Trains `model` (cast to `dtype` in place) with fp32 master weights in Adam.
    `scaler`: a LossScaler (fp16 needs one), or None. `plant(step, model)`, if given, runs
    after each backward: the tests use it to plant an overflow in a gradient."""

    def __init__(self, model: nn.Module, dtype: str, *, lr: float = 1e-3,
                 scaler: LossScaler | None = None, plant=None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model = model.to(DTYPES[dtype])
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.params]
        self.opt = torch.optim.Adam(self.masters, lr=lr, foreach=False)
        self.scaler, self.plant, self.steps = scaler, plant, 0

    def step(self, loss_fn, *args) -> Step:
        scale = self.scaler.scale if self.scaler else 1.0
        loss = loss_fn(self.model, *args)
        (loss * scale).backward()          # 16-bit gradients of S * loss
        if self.plant:
            self.plant(self.steps, self.model)
        for m, p in zip(self.masters, self.params, strict=True):
            m.grad = p.grad.float()        # to fp32 before dividing by S: no underflow
            p.grad = None
        found = self.scaler.unscale_([m.grad for m in self.masters]) if self.scaler else False
        if not found:
            self.opt.step()
            with torch.no_grad():
                for m, p in zip(self.masters, self.params, strict=True):
                    p.copy_(m)             # round the fp32 master to the compute dtype
        if self.scaler:
            self.scaler.update(found)
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return Step(float(loss.detach()), scale, found)


def gradscaler_run(model: nn.Module, dtype: str, batches: list[tuple], loss_fn, *,
                   lr: float, init_scale: float, growth_interval: int, plant=None
                   ) -> tuple[list[Step], list[torch.Tensor]]:
    """The same training driven by torch.amp.GradScaler (the peer): scale, backward, copy the
    16-bit gradients to the fp32 masters, `scaler.step` (unscales; skips on inf), `update`.
    Returns its steps and the final masters."""
    model = model.to(DTYPES[dtype])
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone() for p in params]
    opt = torch.optim.Adam(masters, lr=lr, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    out = []
    for i, args in enumerate(batches):
        scale = scaler.get_scale()
        loss = loss_fn(model, *args)
        scaler.scale(loss).backward()
        if plant:
            plant(i, model)
        for m, p in zip(masters, params, strict=True):
            m.grad = p.grad.float()
            p.grad = None
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():  # a skipped step left the masters as they were
            for m, p in zip(masters, params, strict=True):
                p.copy_(m)
        opt.zero_grad(set_to_none=True)
        # the scale only ever shrinks on an overflow, and then the step was skipped
        out.append(Step(float(loss.detach()), scale, scaler.get_scale() < scale))
    return out, masters
