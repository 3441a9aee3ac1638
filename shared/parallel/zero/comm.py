"""ZeRO's communication, issued in order on one communication thread (a GPU's comm stream).

Every rank submits the same collectives in the same order (the model and its hooks are the
same everywhere), and one worker thread runs them first-in first-out, so they match across
ranks. The compute thread only waits on the futures it needs: that is what lets ZeRO-3 gather
the next unit while this one computes (prefetch), and DDP all-reduce a bucket while the
backward goes on. Every op is recorded as a span (for the timelines) with its size.

Two implementations of each collective, both logged by shared.parallel.comm_log:
- "ring": rings of send/recv (shared.parallel.collectives.ring): the log counts the bytes
  actually sent, (Nd - 1) / Nd of the buffer per rank for reduce-scatter and all-gather;
- "gloo": torch.distributed's own collectives; the log records the ring's volume for them
  (what gloo really moves for a reduce-scatter is more: see the zero lab).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.parallel import comm_log
from shared.parallel.collectives.ring import ring_all_gather, ring_all_reduce, ring_reduce_scatter

IMPLS = ("ring", "gloo")


@dataclass(frozen=True)
class Span:
    op: str          # "all_reduce", "reduce_scatter", "all_gather"
    unit: str
    nbytes: int      # bytes of the full (unsharded) buffer
    start: float     # perf_counter seconds
    end: float


class CommThread:
    """Collectives on one thread, in submission order; `spans` records each one."""

    def __init__(self, group=None, impl: str = "gloo"):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.group, self.impl = group, impl
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zero-comm")
        self.spans: list[Span] = []

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _submit(self, op: str, unit: str, nbytes: int, fn) -> Future:
        def run():
            t0 = time.perf_counter()
            out = fn()
            self.spans.append(Span(op, unit, nbytes, t0, time.perf_counter()))
            return out
        return self.pool.submit(run)

    def all_reduce(self, flat: torch.Tensor, unit: str) -> Future:
        """SUM over ranks, in place; the future's result is `flat`."""
        def run():
            if self.impl == "ring":
                ring_all_reduce(flat, self.group)
            else:
                comm_log.all_reduce(flat, self.group)
            return flat
        return self._submit("all_reduce", unit, _nbytes(flat), run)

    def reduce_scatter(self, flat: torch.Tensor, unit: str) -> Future:
        """SUM over ranks of `flat` (1-D, numel divisible by Nd); the result is this rank's
        chunk, a tensor of its own (ZeRO-2/3 drop the full buffer)."""
        _check_divisible(flat, self.world)

        def run():
            out = torch.empty(flat.numel() // self.world, dtype=flat.dtype, device=flat.device)
            rs = ring_reduce_scatter if self.impl == "ring" else comm_log.reduce_scatter
            rs(out, list(flat.chunk(self.world)), self.group)
            return out
        return self._submit("reduce_scatter", unit, _nbytes(flat), run)

    def all_gather(self, shard: torch.Tensor, full: torch.Tensor, unit: str) -> Future:
        """Every rank's `shard` concatenated in rank order into `full` (1-D, contiguous: its
        chunks are views, so the gather lands in place)."""
        _check_divisible(full, self.world)
        if full.numel() != shard.numel() * self.world:
            raise ValueError(f"full must hold world * shard = {self.world * shard.numel()} "
                             f"elements, got {full.numel()}")

        def run():
            ag = ring_all_gather if self.impl == "ring" else comm_log.all_gather
            ag(list(full.chunk(self.world)), shard, self.group)
            return full
        return self._submit("all_gather", unit, _nbytes(full), run)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_divisible(flat: torch.Tensor, world: int) -> None:
    if flat.ndim != 1 or flat.numel() % world:
        raise ValueError(f"flat must be 1-D with numel divisible by Nd={world}, got "
                         f"{tuple(flat.shape)}")
