"""The same stages under torch.distributed.pipelining, PyTorch's own pipeline runtime.

Its ScheduleGPipe, Schedule1F1B and ScheduleInterleaved1F1B take the very Stage modules our
runtime runs (stages.py), the same microbatches and a loss_fn equal to ours; with
scale_grads=True it divides the accumulated gradients by m, as our loss / m does. Rank r holds
virtual stages r, r + p, ... in both runtimes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from shared.parallel.pipeline.stages import Stage

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
                    "interleaved-1f1b": ScheduleInterleaved1F1B}


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


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
        arg = self.pstages if name == "interleaved-1f1b" else self.pstages[0]
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
