"""Predicted decode-step latency on N SMs: kernel-per-operator versus one persistent kernel.

A discrete-event simulation of a task graph (graph.py); every number is a prediction.

Task time: the roofline (shared/roofline.py) of the task's counted FLOPs and bytes on one SM:
peak/N FLOP/s, and a bandwidth that is HBM's shared among the tasks of its operator that run at
once, min(HBM / min(N, tasks), per-SM cap). The cap is Little's law for one 4-warp CTA per SM
keeping three 16 KB weight tiles in flight over roofline's HBM latency (~100 GB/s): a
lone task cannot stream the whole HBM. A task's rate is the same in both runtimes: when the
persistent kernel overlaps two operators, their sharing of HBM is not charged, a bias in the
mega-kernel's favour that lives only in the tails where operators overlap.

- kernel-per-operator: each operator is one launch. It starts `launch_s` after the previous
  one ends (launch latency, grid ramp-up and drain), its tasks go to whichever SM frees first,
  and it ends when its last task does: the device-wide barrier, with its tail.
- persistent: one launch; worker w runs its queue in order, a task starting `event_s` after
  the last event it waits on is complete (counter polling, MPK's dependency check) and
  `dispatch_s` after its worker's previous task (loading the next task descriptor).

Ablations: launch_s = 0 keeps only the barrier tails (what removing launch overhead alone buys);
the persistent run with the same overheads shows what overlap buys on top.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

from shared.megakernel.graph import operators
from shared.megakernel.schedule import assign
from shared.roofline import hardware, predict


@dataclass(frozen=True)
class GPUModel:
    """The assumed machine. launch_s ≈ a kernel boundary inside a CUDA graph (launch, ramp,
    drain: a few µs); event_s and dispatch_s ≈ a global-memory round trip each. Assumptions,
    not measurements: the lab sweeps them."""

    hw: str = "H100 SXM"
    dtype: str = "bf16"
    launch_s: float = 3e-6
    event_s: float = 1e-6
    dispatch_s: float = 0.3e-6

    @property
    def sms(self) -> int:
        return hardware(self.hw).sms


@dataclass(frozen=True)
class Run:
    """A simulated step: total seconds and (sm, task, start, end) per task."""

    total_s: float
    spans: list[tuple[int, int, float, float]]
    launches: int

    def busy_fraction(self, sms: int) -> float:
        return sum(e - s for _, _, s, e in self.spans) / (sms * self.total_s)


def sm_bandwidth_cap(gpu: GPUModel) -> float:
    """Bytes/s one SM sustains running one 4-warp CTA with 3 × 16 KB loads in flight."""
    hw = hardware(gpu.hw)   # Little's law, as roofline.occupancy_bandwidth, for one SM
    return min(hw.mem_bw, 3 * 16384 / hw.mem_latency_s)


def task_seconds(graph: dict, gpu: GPUModel) -> list[float]:
    """Each task's predicted time on one SM (module docstring)."""
    hw = hardware(gpu.hw)
    cap = sm_bandwidth_cap(gpu)
    times = [0.0] * len(graph["tasks"])
    for group in operators(graph):
        bw = min(cap, hw.mem_bw / min(hw.sms, len(group)))
        one_sm = replace(hw, peak_flops={k: v / hw.sms for k, v in hw.peak_flops.items()},
                         mem_bw=bw)
        for t in group:
            task = graph["tasks"][t]
            times[t] = predict(task["flops"], task["bytes"], one_sm, gpu.dtype).time_s
    return times


def per_operator(graph: dict, gpu: GPUModel = GPUModel()) -> Run:
    times = task_seconds(graph, gpu)
    t, spans = 0.0, []
    groups = operators(graph)
    for group in groups:
        t += gpu.launch_s
        free = [(t, sm) for sm in range(gpu.sms)]
        end = t
        for task in group:             # list scheduling: the next task to the first free SM
            start, sm = heapq.heappop(free)
            stop = start + times[task]
            spans.append((sm, task, start, stop))
            heapq.heappush(free, (stop, sm))
            end = max(end, stop)
        t = end                        # the barrier: the next launch waits for the last task
    return Run(t, spans, len(groups))


def persistent(graph: dict, gpu: GPUModel = GPUModel(), queues: list[list[int]] | None = None
               ) -> Run:
    """`queues` default: schedule.assign's round-robin over one worker per SM."""
    times = task_seconds(graph, gpu)
    queues = assign(graph, gpu.sms) if queues is None else queues
    free = [gpu.launch_s] * len(queues)
    count = [0] * len(graph["events"])
    ready = [0.0] * len(graph["events"])
    heads = [0] * len(queues)
    spans: list[tuple[int, int, float, float]] = []
    progress = True
    while progress:   # advance any worker whose next task has all its events complete: its
        progress = False   # start time depends only on those events and its own last task
        for w, q in enumerate(queues):
            while heads[w] < len(q):
                t = q[heads[w]]
                task = graph["tasks"][t]
                if any(count[e] < graph["events"][e]["need"] for e in task["waits"]):
                    break
                start = max([free[w] + gpu.dispatch_s,
                             *(ready[e] + gpu.event_s for e in task["waits"])])
                free[w] = start + times[t]
                spans.append((w, t, start, free[w]))
                for e in task["triggers"]:
                    count[e] += 1
                    ready[e] = max(ready[e], free[w])
                heads[w] += 1
                progress = True
    if len(spans) < len(graph["tasks"]):
        raise ValueError("queues deadlock: validate.check_schedule names the waiting tasks")
    return Run(max(free), spans, 1)
