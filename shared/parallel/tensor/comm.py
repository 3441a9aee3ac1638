"""The communication of tensor parallelism: Megatron's conjugate operators f and g.

Megatron-LM §3, Fig. 3: a column-parallel layer's input passes through **f** (identity in the
forward, all-reduce in the backward: every rank's partial dL/dx, from its own slice of the
weight, sums to the full one); a row-parallel layer's output passes through **g** (all-reduce in
the forward: each rank holds a partial sum of the product; identity in the backward: the
gradient of a sum reaches every summand unchanged). One attention block or MLP is
``f -> column -> local op -> row -> g``: one all-reduce forward, one backward.

Every all-reduce goes through `TPComm.all_reduce`: shared.parallel.comm_log logs it (count it
with ``with comm_log.recording() as log``) and, for emulated timing on a CPU, a `Pacer` pads the
compute before it to a fixed slot. The pacer travels in the TPComm object the layers hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shared.parallel import comm_log


@dataclass
class Pacer:
    """Emulated compute (CPU only): the compute between two all-reduces is held to `slot_s`
    forward and `2 * slot_s` backward (a backward does twice a forward's FLOPs). The arithmetic
    runs for real; the rank then sleeps to the slot, so ranks sharing two cores measure the
    communication, not the contention. `backward` is set by the caller around loss.backward()."""
    slot_s: float
    backward: bool = False
    last_end: float = field(default_factory=time.perf_counter)
    segments: int = 0
    overruns: int = 0  # segments whose real arithmetic outlasted the slot by > 20%

    def before(self) -> None:
        slot = self.slot_s * (2 if self.backward else 1)
        until = self.last_end + slot
        self.segments += 1
        self.overruns += time.perf_counter() > self.last_end + 1.2 * slot
        while (left := until - time.perf_counter()) > 0:
            time.sleep(left)

    def after(self) -> None:
        self.last_end = time.perf_counter()


@dataclass
class TPComm:
    """A tensor-parallel group: this rank's index, the group size, the process group (None =
    the default one) and an optional pacer."""
    rank: int
    world: int
    group: object = None
    pacer: Pacer | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world must be an int >= 1, got {self.world!r}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {self.rank!r}")

    @classmethod
    def from_default_group(cls) -> TPComm:
        """The whole default process group as one tensor-parallel group."""
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, *, group=None,
                   size: int | None = None) -> torch.Tensor:
        """In-place all-reduce of `t` across the group (or `group` of `size` ranks: the kv
        replicas), logged. On one rank nothing is sent, but the pacer still holds the slot."""
        if self.pacer is not None:
            self.pacer.before()
        if (self.world if group is None else size) > 1:
            comm_log.all_reduce(t, self.group if group is None else group, op=op)
        if self.pacer is not None:
            self.pacer.after()
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `t` along `dim` (rank order). Not differentiable: for
        reading results, e.g. the full logits, never on the training path."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        comm_log.all_gather(parts, t.contiguous(), self.group)
        return torch.cat(parts, dim=dim)


class _CopyToTP(torch.autograd.Function):
    """f: identity forward; backward all-reduces dL/dx (each rank has its slice's share)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad.contiguous().clone()), None


class _ReduceFromTP(torch.autograd.Function):
    """g: forward all-reduces the partial sums; backward is the identity."""

    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Megatron's f, at the input of a column-parallel layer."""
    return _CopyToTP.apply(x, comm)


def reduce_from_tp(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Megatron's g, at the output of a row-parallel layer (or the vocab-parallel embedding)."""
    return _ReduceFromTP.apply(x, comm)
