"""Play a schedule on an ideal machine: fixed durations per action, free communication.

This is the model every paper's bubble formula comes from: with forward time f and full
backward time b + w per microbatch and stage, GPipe and 1F1B both take (m + p - 1)(f + b + w)
and idle (p - 1)(f + b + w) on each rank, a fraction (p - 1)/(m + p - 1) (GPipe §2.3).
A message latency (`comm`) turns it into the model of a real run.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.parallel.pipeline.schedules import Action, Schedule
from shared.parallel.pipeline.validate import dependencies, order, produced, validate


@dataclass(frozen=True)
class Simulation:
    makespan: float
    bubble_fraction: float  # idle share of the makespan, averaged over ranks
    peak_stashed: tuple[int, ...]  # per rank: most microbatch-chunks whose W has not run
    spans: tuple[tuple[tuple[Action, float, float], ...], ...]  # per rank: (action, start, end)


def simulate(schedule: Schedule, f: float = 1.0, b: float = 1.0, w: float = 1.0, *,
             comm: float = 0.0) -> Simulation:
    """Start each action when its rank is free and its inputs exist (per chunk: f, b, w).
    `comm` delays every input that comes from another rank (a message's latency)."""
    for name, value in (("f", f), ("b", b), ("w", w)):
        if not value > 0:
            raise ValueError(f"{name} must be a positive duration, got {value!r}")
    if not comm >= 0:
        raise ValueError(f"comm must be a latency >= 0, got {comm!r}")
    validate(schedule)
    duration = {"F": f, "B": b, "W": w, "BW": b + w}
    finish: dict = {}
    clock = [0.0] * schedule.num_stages
    spans: list[list] = [[] for _ in range(schedule.num_stages)]
    for r, a in order(schedule):  # dependencies come first in this order
        start = max([clock[r]] + [finish[d] + (comm if schedule.place(d[2])[0] != r else 0.0)
                                  for d in dependencies(schedule, r, a)])
        clock[r] = start + duration[a.kind]
        finish.update(dict.fromkeys(produced(schedule, r, a), clock[r]))
        spans[r].append((a, start, clock[r]))
    makespan = max(clock)
    busy = [sum(e - s for _, s, e in rank) for rank in spans]
    bubble = sum(makespan - x for x in busy) / (len(busy) * makespan)
    return Simulation(makespan, bubble, tuple(peak_stash(rank) for rank in spans),
                      tuple(tuple(rank) for rank in spans))


def peak_stash(spans) -> int:
    """Most activations held at once: a forward stashes one at its start, the W (or BW) that
    consumes it frees it at its end. Frees sort before stashes at equal times."""
    events = []
    for a, start, end in spans:
        if a.kind == "F":
            events.append((start, 1))
        elif a.kind in ("W", "BW"):
            events.append((end, -1))
    level = peak = 0
    for _, delta in sorted(events):
        level += delta
        peak = max(peak, level)
    return peak
