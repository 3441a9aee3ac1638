"""Data parallelism in four stages on one engine: DDP (stage 0) and ZeRO-1, -2, -3.

Rajbhandari et al. 2020 (ZeRO), §5 and Figure 1. With Ψ trainable parameters, Nd ranks and
an optimizer keeping K bytes per parameter (Adam in mixed precision: fp32 master, m, v; K=12):
- stage 0, DDP: every rank holds everything, (2 + 2 + K)Ψ; gradients are all-reduced in
  buckets (one per unit) as soon as the backward has finished a bucket (§7.1: 2Ψ moved);
- stage 1, P_os: optimizer states sharded, 2Ψ + 2Ψ + KΨ/Nd; the full gradients are
  reduce-scattered, each rank updates its shard, the new parameters are all-gathered (2Ψ);
- stage 2, P_os+g: gradients sharded too, 2Ψ + (2 + K)Ψ/Nd: each unit's gradients are
  reduce-scattered the moment they are complete and the full ones dropped (2Ψ);
- stage 3, P_os+g+p: parameters sharded too, (2 + 2 + K)Ψ/Nd: each unit is all-gathered
  before its forward and again before its backward, and freed after each (3Ψ, §7.2.2);
  with `prefetch`, the next unit's gather is issued before this unit computes.
Masters are fp32 (the optimizer's shard, or all of it for DDP); the model computes in
`compute_dtype`. Gradients are averaged over ranks (each rank's loss is its local mean).

`slot_s` emulates compute: each block's forward is padded to slot_s and its backward to
2 * slot_s (real arithmetic, then sleep), counted from when its parameters are there. Four
ranks on two cores cannot all compute at once; padded, each behaves as if it had its own
device, and what is left to measure is the communication and how much of it hides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from shared.parallel.zero.comm import CommThread
from shared.parallel.zero.flat import FlatUnit, storage_bytes
from shared.parallel.zero.model import units

STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class StepResult:
    loss: float                 # this rank's loss (its local mean)
    state_bytes: dict[str, int]  # per-rank model states: see ZeroEngine.state_bytes
    skipped: bool = False       # an inf/NaN gradient on any rank: no rank updated


class ZeroEngine:
    def __init__(self, model: nn.Module, stage: int, comm: CommThread, *,
                 compute_dtype: torch.dtype = torch.float32, lr: float = 1e-3,
                 prefetch: bool = True, slot_s: float | None = None, scaler=None):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES} (0 is DDP), got {stage!r}")
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"compute_dtype must be float32, bfloat16 or float16, got "
                            f"{compute_dtype}")
        if slot_s is not None and not slot_s > 0:
            raise ValueError(f"slot_s must be None or > 0 seconds, got {slot_s!r}")
        self.model, self.stage, self.comm, self.prefetch = model, stage, comm, prefetch
        self.slot_s = slot_s
        self.scaler = scaler  # a mixed_precision.LossScaler, or None
        self.world, self.rank = comm.world, comm.rank
        shard_world, shard_rank = (1, 0) if stage == 0 else (self.world, self.rank)
        self.units = [FlatUnit(name, ps, shard_world, shard_rank, compute_dtype)
                      for name, ps in units(model)]
        self.frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in self.frozen:
            p.data = p.data.to(compute_dtype)
        # fp32 masters: this rank's shard (its slice of the flat unit), the optimizer's params
        self.masters = [u.my_slice(u.full).float().clone() for u in self.units]
        self.opt = torch.optim.Adam(self.masters, lr=lr, foreach=False)
        self.grad_bufs = ([u.grads_as_views() for u in self.units] if stage <= 1 else None)
        self.shards = None
        if stage == 3:  # the persistent parameter shard; the full buffers are freed
            self.shards = [u.my_slice(u.full).clone() for u in self.units]
            for u in self.units:
                u.free()
        self.spans: list[tuple[str, str, float, float]] = []  # compute: (kind, unit, t0, t1)
        self.memory: list[tuple[float, int]] = []  # (t, parameter bytes resident)
        self._index = {id(p): i for i, u in enumerate(self.units) for p in u.params}
        self._install_hooks()

    # -- hooks -----------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for u in self.units:
            for p in u.params:
                p.register_post_accumulate_grad_hook(self._on_grad)
        for i, block in enumerate(self.model.layers, start=1):  # unit i is layers.{i-1}
            block.register_forward_pre_hook(lambda m, a, i=i: self._before_forward(i))
            block.register_forward_hook(lambda m, a, out, i=i: self._after_forward(i, out))

    def _before_forward(self, i: int) -> None:
        if self.stage == 3:
            self._need(i)
            if self.prefetch and i + 1 < len(self.units):
                self._gather(i + 1)
        self._t_fwd = time.perf_counter()

    def _after_forward(self, i: int, out: torch.Tensor) -> torch.Tensor:
        if self.slot_s:
            _sleep_until(self._t_fwd + self.slot_s)
        self.spans.append(("forward", self.units[i].name, self._t_fwd, time.perf_counter()))
        if self.stage == 3:
            self._free(i)
        if out.requires_grad:
            out.register_hook(lambda g, i=i: self._before_backward(i))
        return out

    def _before_backward(self, i: int) -> None:
        if self.stage == 3:
            self._need(i)
            if self.prefetch and i - 1 >= 1:  # backward runs blocks in reverse
                self._gather(i - 1)
        self._t_bwd[i] = time.perf_counter()

    def _on_grad(self, p: nn.Parameter) -> None:
        i = self._index[id(p)]
        self._ready[i] += 1
        u = self.units[i]
        if self._ready[i] < len(u.params):
            return
        if i in self._t_bwd:
            if self.slot_s:
                _sleep_until(self._t_bwd[i] + 2 * self.slot_s)
            self.spans.append(("backward", u.name, self._t_bwd[i], time.perf_counter()))
        if self.stage == 0:
            self._grad_futs[i] = self.comm.all_reduce(self.grad_bufs[i], u.name)
        elif self.stage == 1:
            self._grad_futs[i] = self.comm.reduce_scatter(self.grad_bufs[i], u.name)
        else:  # ZeRO-2/3: reduce-scatter now, drop the full gradients
            flat = u.flat_grad()
            for q in u.params:
                q.grad = None
            self._grad_futs[i] = self.comm.reduce_scatter(flat, u.name)
            if self.stage == 3 and i > 0:
                self._free(i)

    # -- ZeRO-3 parameter movement -----------------------------------------------------------
    def _gather(self, i: int) -> None:
        """Issue the all-gather of unit i (no-op if gathered or on its way)."""
        u = self.units[i]
        if i in self._gathers or u.gathered:
            return
        self._gathers[i] = self.comm.all_gather(self.shards[i], u.allocate(), u.name)
        self._mark()

    def _need(self, i: int) -> None:
        """Unit i's full parameters, now: wait for its gather (issued here if not yet)."""
        self._gather(i)
        fut = self._gathers.pop(i, None)
        if fut is not None:
            t0 = time.perf_counter()
            fut.result()
            self.spans.append(("wait", self.units[i].name, t0, time.perf_counter()))

    def _free(self, i: int) -> None:
        self.units[i].free()
        self._mark()

    def _mark(self) -> None:
        self.memory.append((time.perf_counter(), self.param_bytes()))

    # -- the step ------------------------------------------------------------------------------
    def step(self, loss_fn, *args) -> StepResult:
        """One training step on this rank's batch: `loss_fn(model, *args)` -> scalar loss."""
        self._ready = [0] * len(self.units)
        self._grad_futs: dict = {}
        self._gathers: dict = {}
        self._t_bwd: dict = {}
        if self.stage == 3:
            self._need(0)  # the root: the embedding is used first, the tied head last
        if self.grad_bufs is not None:
            for buf in self.grad_bufs:
                buf.zero_()
        loss = loss_fn(self.model, *args)
        (loss * self.scaler.scale if self.scaler else loss).backward()
        missing = [u.name for i, u in enumerate(self.units) if i not in self._grad_futs]
        if missing:
            raise RuntimeError(f"units {missing} got no gradient this step: every trainable "
                               "parameter must take part in the loss")
        grads = [self._grad_futs[i].result() for i in range(len(self.units))]
        grad_bytes = self._grad_bytes(grads)  # at the end of the backward: its peak
        skipped = self._update(grads)
        return StepResult(float(loss.detach()), {**self.state_bytes(), "grads": grad_bytes},
                          skipped)

    @torch.no_grad()
    def _update(self, grads: list[torch.Tensor]) -> bool:
        for u, master, g in zip(self.units, self.masters, grads, strict=True):
            master.grad = u.my_slice(g).float() if self.stage == 0 else g.float()
            master.grad.div_(self.world)
        if self.scaler and self._overflow():
            for m in self.masters:
                m.grad = None
            if self.stage == 3:
                self._free(0)
            return True  # parameters unchanged everywhere: nothing to write back or gather
        self.opt.step()
        for m in self.masters:
            m.grad = None
        if self.stage == 0:
            for u, m in zip(self.units, self.masters, strict=True):
                u.full.copy_(m)
        elif self.stage in (1, 2):  # the updated shards, all-gathered into every rank's full
            futs = [self.comm.all_gather(m.to(u.dtype), u.full, u.name)
                    for u, m in zip(self.units, self.masters, strict=True)]
            for f in futs:
                f.result()
        else:
            for s, m in zip(self.shards, self.masters, strict=True):
                s.copy_(m)
            self._free(0)
        return False

    def _overflow(self) -> bool:
        """Unscale this rank's gradient shards and agree on overflow with every rank: each
        rank sees only its shard, so an inf one rank holds must stop all of them (else the
        shards of one model would step apart). Updates the scaler."""
        found = self.scaler.unscale_([m.grad for m in self.masters])
        flag = torch.tensor([float(found)], device=self.masters[0].device)
        found = bool(self.comm.all_reduce(flag, "found_inf").result().item() > 0)
        self.scaler.update(found)
        return found

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter by name, whole (ZeRO-3 gathers each unit, copies it, frees it)."""
        if self.stage == 3:
            self._gathers = {}
            for i in range(len(self.units)):
                self._need(i)
        out = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        if self.stage == 3:
            for i in range(len(self.units)):
                self._free(i)
        return out

    # -- accounting ----------------------------------------------------------------------------
    def param_bytes(self) -> int:
        """Parameter bytes resident now (gathered full units, shards, frozen parameters)."""
        tensors = [u.full for u in self.units] + list(self.frozen) + list(self.shards or [])
        return storage_bytes(tensors)

    def _grad_bytes(self, reduced: list[torch.Tensor]) -> int:
        """Gradient bytes held: DDP/ZeRO-1's full buffers, else the reduced shards."""
        return storage_bytes(self.grad_bufs if self.grad_bufs is not None else reduced)

    def state_bytes(self) -> dict[str, int]:
        """Per-rank model-state bytes now (sums of storage bytes): parameters, and the
        optimizer's (fp32 masters and Adam's moments). A step's result adds the gradients."""
        state = [t for s in self.opt.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        return {"params": self.param_bytes(), "optimizer": storage_bytes(self.masters + state)}


def _sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)
