"""Read recorded runs: bubble fraction and throughput from spans, and timelines drawn like the
papers' figures (one row per rank, time to the right, a box per action, microbatch inside).

Spans are ``(Action, start, end)`` per rank, from the simulator or from real runs (each
rank's clock is measured from a barrier all ranks leave together, runtime.py / worker.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from shared.parallel.pipeline.schedules import Action, Schedule
from shared.parallel.pipeline.validate import dependencies, produced

Spans = Sequence[Sequence[tuple[Action, float, float]]]  # per rank
COLORS = {"F": "#4C72B0", "B": "#55A868", "W": "#C8A23A", "BW": "#55A868"}


def bubble_fraction(spans: Spans) -> float:
    """Idle share of the makespan, averaged over ranks. The makespan runs from the first
    action's start to the last action's end on any rank; waiting for a message is idle."""
    start = min(s for rank in spans for _, s, _ in rank)
    end = max(e for rank in spans for _, _, e in rank)
    busy = [sum(e - s for _, s, e in rank) for rank in spans]
    return sum(1 - b / (end - start) for b in busy) / len(spans)


def makespan(spans: Spans) -> float:
    return (max(e for rank in spans for _, _, e in rank)
            - min(s for rank in spans for _, s, _ in rank))


def durations(spans: Spans) -> dict[str, float]:
    """Median duration of each kind of action in a run."""
    by_kind: dict[str, list[float]] = {}
    for rank in spans:
        for a, s, e in rank:
            by_kind.setdefault(a.kind, []).append(e - s)
    return {k: statistics.median(v) for k, v in by_kind.items()}


def hop_latency(schedule: Schedule, spans: Spans) -> float:
    """Median delay from a message's producer ending to its consumer starting, over the
    consumers that were waiting for that message (idle, and it was their last input)."""
    end = {}
    for r, rank in enumerate(spans):
        for a, _, e in rank:
            end.update(dict.fromkeys(produced(schedule, r, a), e))
    delays = []
    for r, rank in enumerate(spans):
        for i, (a, s, _) in enumerate(rank):
            ready = rank[i - 1][2] if i else float("-inf")
            deps = [(end[d], d) for d in dependencies(schedule, r, a)]
            if not deps:
                continue
            last, d = max(deps)
            if schedule.place(d[2])[0] != r and last > ready:
                delays.append(s - last)
    return max(0.0, statistics.median(delays)) if delays else 0.0


def plot_timeline(ax, spans: Spans, title: str = "", *, unit: float = 1.0,
                  chunks: int = 1) -> None:
    """Boxes per rank (rank 0 on top): F blue, B / BW green, W gold; later chunks hatched.
    Times are divided by `unit` (e.g. 1e-3 for milliseconds)."""
    t0 = min(s for rank in spans for _, s, _ in rank)
    for r, rank in enumerate(spans):
        for a, s, e in rank:
            x, width = (s - t0) / unit, (e - s) / unit
            ax.barh(r, width, left=x, height=0.8, color=COLORS[a.kind], edgecolor="white",
                    linewidth=0.5, hatch="//" if a.chunk else None)
            ax.text(x + width / 2, r, str(a.mb), ha="center", va="center", fontsize=6,
                    color="white")
    ax.set_yticks(range(len(spans)), [f"rank {r}" for r in range(len(spans))])
    ax.set_ylim(len(spans) - 0.5, -0.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("time" if unit == 1.0 else f"time ({'ms' if unit == 1e-3 else unit})")
