"""Run a schedule for real: one rank's loop over its actions (torch.distributed).

For each action of this rank, in order (schedules.py):
  F(i, c):  receive the activation (or take microbatch i's tokens on stage 0), run the chunk,
            stash (input, output) for the backward, send the output downstream;
            the last stage computes loss_i / m (gradient accumulation over m microbatches
            averages to the full batch's mean loss).
  BW(i, c): receive dL/d(output), backpropagate through the stash, send dL/d(input) upstream;
            parameter gradients accumulate in .grad.
  B / W:    the two halves of BW (backward.py): B sends dL/d(input) at once, W comes later.
Each action's start and end are recorded (after its receive, so waiting counts as bubble).
When an action ends, its send and a later action's receive go out in one batch (comms.py: what
keeps NCCL from deadlocking); on a GPU nothing synchronizes the device until the run ends.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.parallel.memory.checkpointing import SavedBytes
from shared.parallel.pipeline.backward import (
    backward_input,
    backward_weight,
    held_bytes,
    split_plan,
)
from shared.parallel.pipeline.comms import P2P
from shared.parallel.pipeline.schedules import Action, Schedule
from shared.parallel.pipeline.stages import Stage, sleep_until


@dataclass
class RankRun:
    rank: int
    loss: float | None  # summed over microbatches; only on the rank holding the last stage
    spans: list[tuple[Action, float, float]]  # (action, start, end), seconds since t0
    peak_stashed: int  # most microbatch-chunks held for a backward at once
    peak_stashed_bytes: int  # most bytes held for backwards: saved activations, plus what B
                             # captured for W (B/W split), summed at the moment of the peak
    stash_bytes: list[int]  # saved activation bytes of each stashed forward, in order
    peak_sends: int  # most send buffers held between actions (comms.P2P releases the rest)


class _Clock:
    """Action edges in seconds since t0. On a GPU, kernels run behind the host: a CUDA event
    recorded on the stream marks an edge where the device reaches it, and all are read once,
    after the run, so nothing synchronizes the device mid-schedule (the host keeps queueing
    work ahead of the GPU)."""

    def __init__(self, like: torch.Tensor, t0: float):
        self.cuda, self.t0 = like.is_cuda, t0
        if self.cuda:
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
            self.origin_s = time.perf_counter() - t0

    def now(self):
        if not self.cuda:
            return time.perf_counter() - self.t0
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, spans: list) -> list[tuple[Action, float, float]]:
        if not self.cuda:
            return spans
        if spans:  # events complete in stream order: the last one waits for all
            spans[-1][2].synchronize()
        return [(a, self.origin_s + self.origin.elapsed_time(s) / 1e3,
                 self.origin_s + self.origin.elapsed_time(e) / 1e3) for a, s, e in spans]


def run_schedule(schedule: Schedule, rank: int, stages: dict[int, Stage],
                 microbatches: list[tuple[torch.Tensor, torch.Tensor]], *,
                 comm: P2P, t0: float) -> RankRun:
    """Execute ``schedule.ranks[rank]``. `stages[c]` is this rank's chunk c; `microbatches`
    are (tokens [b, T], targets [b, T]); `comm` carries this rank's messages."""
    m, last = schedule.num_microbatches, schedule.num_virtual - 1
    stash: dict[tuple[int, int], tuple] = {}  # (mb, chunk) -> (input, output, saved bytes)
    weight_jobs: dict[tuple[int, int], object] = {}  # B/W splits awaiting their W
    split_backward = {(a.mb, a.chunk) for a in schedule.ranks[rank] if a.kind == "B"}
    spans, sizes = [], []
    chunk_bytes: dict[int, int] = {}  # saved activation bytes of one microbatch, per chunk
    loss_sum, peak, peak_bytes = None, 0, 0  # the loss stays on the device until the end
    clock = _Clock(comm.like, t0)
    actions = schedule.ranks[rank]
    comm.start()
    for i, a in enumerate(actions):
        s = schedule.stage(rank, a.chunk)
        stage = stages[a.chunk]
        params = list(stage.parameters())
        send = None
        if a.kind == "F":
            x = microbatches[a.mb][0] if s == 0 else comm.recv(i)
            start = clock.now()
            t_start = time.perf_counter()
            if s > 0:
                x.requires_grad_()
            # Every microbatch of a chunk saves the same tensors: count them on the first
            # (a Python hook per saved tensor would cost as much as this tiny forward).
            saved = SavedBytes(params) if a.chunk not in chunk_bytes else None
            with saved if saved else contextlib.nullcontext():
                inp, out = stage.run(x, pad=False)
                if s == last:
                    targets = microbatches[a.mb][1]
                    out = F.cross_entropy(out.flatten(0, 1), targets.flatten()) / m
                    loss_sum = out.detach() if loss_sum is None else loss_sum + out.detach()
            if saved:
                chunk_bytes[a.chunk] = saved.peak
            nbytes = chunk_bytes[a.chunk]
            sizes.append(nbytes)
            stash[a.mb, a.chunk] = (inp, out, nbytes)
            if (a.mb, a.chunk) in split_backward:  # B and W follow: cut the graph now
                weight_jobs[a.mb, a.chunk] = split_plan(out, inp, params)
            if stage.slots is not None:  # the emulated forward ends here, then we send
                sleep_until(t_start + stage.slots.f)
            peak = max(peak, len(stash))
            peak_bytes = max(peak_bytes, sum(v[2] for v in stash.values()))
            send = out.detach() if s < last else None
        elif a.kind in ("B", "BW"):
            inp, out, _ = stash[a.mb, a.chunk]
            g = comm.recv(i)  # None on the last stage: out is the loss
            start = clock.now()
            if stage.slots is not None:  # the emulated backward counts from here
                stage.slots.backward = stage.slots.b + (stage.slots.w if a.kind == "BW" else 0)
                stage.slots.t_backward = time.perf_counter()
            if a.kind == "BW":
                inputs = params + ([inp] if s > 0 else [])
                torch.autograd.backward(out, g, inputs=inputs)
                send = inp.grad if s > 0 else None
                del stash[a.mb, a.chunk]
            else:
                job = weight_jobs[a.mb, a.chunk]
                grad_in = backward_input(job, g)
                send = grad_in if s > 0 else None
                # Until W runs, this microbatch holds its forward's saved tensors (the graph is
                # retained for W) and the gradients B captured for W: count both.
                inp, out, nbytes = stash[a.mb, a.chunk]
                stash[a.mb, a.chunk] = (inp, out, nbytes + held_bytes(job))
                peak_bytes = max(peak_bytes, sum(v[2] for v in stash.values()))
        elif a.kind == "W":
            start = clock.now()
            t_start = time.perf_counter()
            backward_weight(weight_jobs.pop((a.mb, a.chunk)))
            del stash[a.mb, a.chunk]
            if stage.slots is not None:
                sleep_until(t_start + stage.slots.w)
        else:
            raise ValueError(f"rank {rank}: unknown action {a!r}")
        spans.append((a, start, clock.now()))
        comm.finish(i, send)  # this action's send and a later receive, one batch
    comm.flush()
    loss = loss_sum.item() if loss_sum is not None else None  # the run's one host read
    return RankRun(rank, loss, clock.seconds(spans), peak, peak_bytes, sizes, comm.peak_sends)
