"""The same stages under torch.distributed.pipelining, PyTorch's own pipeline runtime.

Its ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B and ScheduleInterleavedZeroBubble
(with one chunk per rank: ZB-H1) take the very Stage modules our runtime runs (stages.py), the
same microbatches and a loss_fn equal to ours; with scale_grads=True it divides the accumulated
gradients by m, as our loss / m does. Rank r holds virtual stages r, r + p, ... in both.

`torch_actions` reads, without a process group, the order in which torch's schedules run
their compute on every rank, as our `Action`s: the identity proof of "same schedule".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from shared.parallel.pipeline.schedules import Action, Schedule
from shared.parallel.pipeline.stages import Stage

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
                    "interleaved-1f1b": ScheduleInterleaved1F1B,
                    "zb-h1": ScheduleInterleavedZeroBubble}
_MULTI = ("interleaved-1f1b", "zb-h1")  # classes that take a list of stages


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class _Recorder:
    """Stands in for a PipelineStage: no module, no messages; it records the compute calls
    a schedule makes on it. torch's F / full backward / input backward ("I") / weight
    backward become our F / BW / B / W."""

    def __init__(self, log: list, stage_index: int, p: int, v: int, rank: int):
        self.log, self.stage_index, self.chunk = log, stage_index, stage_index // p
        self.num_stages, self.group_size, self.group_rank = p * v, p, rank
        self.is_first, self.is_last = stage_index == 0, stage_index == p * v - 1
        self.submod = None  # not FSDP-wrapped

    def forward_one_chunk(self, mb, *args, **kwargs):
        self.log.append(Action("F", mb, self.chunk))

    def backward_one_chunk(self, mb, loss=None, full_backward=True, last_backward=False):
        self.log.append(Action("BW" if full_backward else "B", mb, self.chunk))

    def backward_weight_one_chunk(self, mb, last_backward=False):
        self.log.append(Action("W", mb, self.chunk))

    def _no_ops(self, *args, **kwargs):
        return []

    get_fwd_recv_ops = get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = _no_ops

    def perform_reduce_grad(self, *args, **kwargs):
        pass

    # p = 1: neighbouring stages share the rank and hand tensors over locally
    set_local_fwd_input = set_local_bwd_input = get_local_bwd_output = perform_reduce_grad

    def clear_runtime_states(self):
        pass


def torch_actions(name: str, num_stages: int, num_microbatches: int, *,
                  chunks: int = 1) -> Schedule:
    """Replay torch's schedule `name` on recording stages, rank by rank, and return the
    compute it ran as a Schedule. This runs torch's own `_step_microbatches` (the loop a real
    step runs), not its `pipeline_order` display IR: for Schedule1F1B that IR numbers the last
    rank's forwards from 1 (torch 2.13), while its step loop runs 0..m-1."""
    if name not in SCHEDULE_CLASSES:
        raise ValueError(f"name must be one of {tuple(SCHEDULE_CLASSES)}, got {name!r}")
    p, m, v = num_stages, num_microbatches, chunks
    if v != 1 and name != "interleaved-1f1b":
        raise ValueError(f"{name} runs one chunk per rank: chunks must be 1, got {v}")
    cls = SCHEDULE_CLASSES[name]
    ranks = []
    for r in range(p):
        log: list[Action] = []
        stages = [_Recorder(log, c * p + r, p, v, r) for c in range(v)]
        sched = cls(stages if name in _MULTI else stages[0], n_microbatches=m,
                    loss_fn=lambda out, target: None)
        # No shapes to infer and nothing to allocate: skip the stage set-up.
        if isinstance(sched, PipelineScheduleSingle):
            sched._initialize_stage = lambda *a, **k: None
        else:
            sched._initialize_stages = lambda *a, **k: None
        sched._step_microbatches(None, None, [None] * m, None)
        ranks.append(tuple(log))
    return Schedule(f"torch {name}", p, m, v, tuple(ranks))


class TorchPipeline:
    """torch.distributed.pipelining over this rank's chunks; `step` runs one batch."""

    def __init__(self, name: str, rank: int, p: int, stages: dict[int, Stage],
                 num_microbatches: int, device: torch.device):
        if name not in SCHEDULE_CLASSES:
            raise ValueError(f"torch.distributed.pipelining comparison covers "
                             f"{tuple(SCHEDULE_CLASSES)}, got {name!r}")
        v = len(stages)
        self.rank, self.p, self.v, self.m = rank, p, v, num_microbatches
        self.pstages = [PipelineStage(stages[c], c * p + rank, p * v, device)
                        for c in range(v)]
        cls = SCHEDULE_CLASSES[name]
        arg = self.pstages if name in _MULTI else self.pstages[0]
        self.schedule = cls(arg, n_microbatches=num_microbatches, loss_fn=_loss,
                            scale_grads=True)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float | None:
        """tokens, targets: the whole batch [m * b, T]; returns the mean loss on the rank
        holding the last stage, else None."""
        first = self.rank == 0
        last = self.rank == self.p - 1  # last virtual stage p*v - 1 lives on rank p - 1
        losses: list[torch.Tensor] = []
        args = (tokens,) if first else ()
        kwargs = {"target": targets, "losses": losses} if last else {}
        self.schedule.step(*args, **kwargs)
        return float(torch.stack(losses).detach().mean()) if last else None
