"""Reject a task graph (graph.py) that would hang or compute the wrong thing, before it runs.

A persistent kernel that waits on an event nobody triggers spins forever; one that waits on too
few triggers reads a half-written buffer. So every graph and every worker assignment passes here
first (MPK checks its graphs at compile time too, §4):

1. shape: known ops, event ids in range, regions inside their buffers;
2. counts: each awaited event is triggered exactly `need` times (a missing trigger would hang,
   an extra one would let a waiter through early);
3. acyclic: a cycle of waits is a deadlock, reported with the tasks on it;
4. data flow: with the task list as the program order, every read is ordered after the last
   write of the same elements and every write after the reads and the write before it, by the
   events alone (ancestors in the graph) — the operator-level data flow the model implies;
5. schedule: per-worker task lists, each run in order, finish (no worker waits for a task queued
   behind a waiting task).
"""

from __future__ import annotations

import bisect
from collections import deque

from shared.megakernel.graph import OPS


class GraphError(ValueError):
    """A graph or schedule that must not run; the message names the tasks and events."""


def _task_name(graph: dict, t: int) -> str:
    task = graph["tasks"][t]
    return f"task {t} ({task['op']}, layer {task['layer']})"


def check_shape(graph: dict) -> None:
    tasks, events, bufs = graph["tasks"], graph["events"], graph["buffers"]
    for i, t in enumerate(tasks):
        if t["id"] != i:
            raise GraphError(f"task {i} has id {t['id']}: ids must be list positions")
        if t["op"] not in OPS:
            raise GraphError(f"{_task_name(graph, i)}: unknown op, expected one of {OPS}")
        for e in (*t["waits"], *t["triggers"]):
            if not isinstance(e, int) or not 0 <= e < len(events):
                raise GraphError(f"{_task_name(graph, i)} names event {e!r}; the graph has "
                                 f"{len(events)} events")
        for buf, r0, r1, c0, c1 in (*t["reads"], *t["writes"]):
            if buf not in bufs:
                raise GraphError(f"{_task_name(graph, i)} touches unknown buffer {buf!r}")
            rows, cols = bufs[buf]
            if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
                raise GraphError(f"{_task_name(graph, i)}: region {buf}[{r0}:{r1}, {c0}:{c1}] "
                                 f"is outside {buf} {rows}×{cols}")


def check_counts(graph: dict) -> None:
    fired = [0] * len(graph["events"])
    awaited = [False] * len(graph["events"])
    for t in graph["tasks"]:
        for e in t["triggers"]:
            fired[e] += 1
        for e in t["waits"]:
            awaited[e] = True
    for e, ev in enumerate(graph["events"]):
        if fired[e] != ev["need"] or (awaited[e] and ev["need"] == 0):
            what = "missing trigger: a waiter would hang" if fired[e] < ev["need"] or \
                fired[e] == 0 else "extra trigger: a waiter would pass early"
            raise GraphError(f"event {e} ({ev['name']}) is awaited for need={ev['need']} but "
                             f"triggered {fired[e]} times ({what})")


def predecessors(graph: dict) -> list[set[int]]:
    """For each task, the tasks that trigger an event it waits on."""
    producers: list[list[int]] = [[] for _ in graph["events"]]
    for t in graph["tasks"]:
        for e in t["triggers"]:
            producers[e].append(t["id"])
    return [{p for e in t["waits"] for p in producers[e]} for t in graph["tasks"]]


def topological_order(graph: dict) -> list[int]:
    """Kahn's algorithm; GraphError naming a cycle's tasks if there is one."""
    preds = predecessors(graph)
    succs: list[list[int]] = [[] for _ in preds]
    for t, ps in enumerate(preds):
        for p in ps:
            succs[p].append(t)
    indeg = [len(ps) for ps in preds]
    ready = deque(t for t, d in enumerate(indeg) if d == 0)
    order = []
    while ready:
        t = ready.popleft()
        order.append(t)
        for s in succs[t]:
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
    if len(order) < len(preds):
        stuck = [t for t, d in enumerate(indeg) if d > 0]
        raise GraphError(f"the graph has a cycle: {len(stuck)} tasks are on it or wait behind "
                         "it, e.g. " + ", ".join(_task_name(graph, t) for t in stuck[:4]))
    return order


def _ancestors(graph: dict, order: list[int]) -> list[int]:
    """Bitsets (Python ints): bit p of anc[t] is set iff task p must finish before t starts."""
    preds = predecessors(graph)
    anc = [0] * len(order)
    for t in order:
        acc = 0
        for p in preds[t]:
            acc |= anc[p] | (1 << p)
        anc[t] = acc
    return anc


def check_dataflow(graph: dict, order: list[int]) -> None:
    """Per buffer row, segments [c0, c1) remember their last writer and readers since."""
    anc = _ancestors(graph, order)
    state: dict[tuple[str, int], tuple[list[list], list[int]]] = {}

    def segments(buf, row, c0, c1):
        """The row's segments, split so that [c0, c1) is a union of whole segments. Kept sorted
        with their starts beside them, so a lookup bisects: Qwen3's logits row has ~2400."""
        segs, starts = state.setdefault(
            (buf, row), ([[0, graph["buffers"][buf][1], None, set()]], [0]))
        for cut in (c0, c1):
            i = bisect.bisect_right(starts, cut) - 1
            a, b, w, rd = segs[i]
            if a < cut < b:
                segs[i:i + 1] = [[a, cut, w, set(rd)], [cut, b, w, set(rd)]]
                starts.insert(i + 1, cut)
        return segs[bisect.bisect_left(starts, c0):bisect.bisect_left(starts, c1)]

    def need(t, earlier, what, buf, row):
        if earlier is not None and earlier != t and not anc[t] >> earlier & 1:
            raise GraphError(f"{_task_name(graph, t)} {what} {buf}[{row}] of "
                             f"{_task_name(graph, earlier)} without an event ordering them")

    for t in range(len(graph["tasks"])):
        task = graph["tasks"][t]
        for buf, r0, r1, c0, c1 in task["reads"]:
            for row in range(r0, r1):
                for seg in segments(buf, row, c0, c1):
                    need(t, seg[2], "reads the write to", buf, row)
                    seg[3].add(t)
        for buf, r0, r1, c0, c1 in task["writes"]:
            for row in range(r0, r1):
                for seg in segments(buf, row, c0, c1):
                    need(t, seg[2], "overwrites the write to", buf, row)
                    for reader in seg[3]:
                        need(t, reader, "overwrites what is read by", buf, row)
                    seg[2], seg[3] = t, set()


def validate(graph: dict, *, dataflow: bool = True) -> list[int]:
    """Run the checks (module docstring); return a topological order. `dataflow=False` skips
    the element-level check, which is slow on graphs of tens of thousands of tasks."""
    for key in ("tasks", "events", "buffers"):
        if key not in graph:
            raise GraphError(f"graph has no {key!r}")
    check_shape(graph)
    check_counts(graph)
    order = topological_order(graph)
    if dataflow:
        check_dataflow(graph, order)
    return order


def check_schedule(graph: dict, queues: list[list[int]]) -> None:
    """Each task queued exactly once, and in-order workers never deadlock: a worker blocked on
    an event whose producer sits behind a blocked task in some queue would spin forever."""
    n = len(graph["tasks"])
    seen = sorted(t for q in queues for t in q)
    if seen != list(range(n)):
        raise GraphError(f"the queues must hold each of the {n} tasks once; they hold "
                         f"{len(seen)} entries covering {len(set(seen))} tasks")
    count = [0] * len(graph["events"])
    heads = [0] * len(queues)
    done, progress = 0, True
    while progress:
        progress = False
        for w, q in enumerate(queues):
            while heads[w] < len(q):
                task = graph["tasks"][q[heads[w]]]
                if any(count[e] < graph["events"][e]["need"] for e in task["waits"]):
                    break
                for e in task["triggers"]:
                    count[e] += 1
                heads[w] += 1
                done += 1
                progress = True
    if done < n:
        blocked = [(w, q[heads[w]]) for w, q in enumerate(queues) if heads[w] < len(q)]
        raise GraphError("the schedule deadlocks: " + ", ".join(
            f"worker {w} waits at {_task_name(graph, t)}" for w, t in blocked[:4]))
