"""Check a schedule before running it: every action once, every dependency met, no deadlock.

The runtime's communication model (runtime.py, comms.py): an action that produces a tensor
for another rank posts a non-blocking send as it ends; an action that needs a tensor from
another rank posts its receive right before it starts and blocks on it. Under that model a
schedule deadlocks exactly when some ranks wait, each on an action another waiting rank has
not run yet: `validate` plays the schedule in that order and names the actions it sticks on.
It also checks that each pair of ranks receives in the order it sends (`fifo_order`), which
NCCL needs: it matches point-to-point messages in order, not by tag.
"""

from __future__ import annotations

from collections.abc import Iterator

from shared.parallel.pipeline.schedules import KINDS, Action, Schedule

Unit = tuple[str, int, int]  # (kind, microbatch, virtual stage)


def dependencies(schedule: Schedule, rank: int, action: Action) -> Iterator[Unit]:
    """The units that must finish before `action` on `rank` may start.

    F(i, s) needs F(i, s-1); B or BW(i, s) needs F(i, s) and the input gradient of stage s+1,
    i.e. B or BW(i, s+1); W(i, s) needs B(i, s)."""
    s = schedule.stage(rank, action.chunk)
    last = schedule.num_virtual - 1
    if action.kind == "F":
        if s > 0:
            yield ("F", action.mb, s - 1)
    elif action.kind in ("B", "BW"):
        yield ("F", action.mb, s)
        if s < last:
            yield ("grad", action.mb, s + 1)
    else:
        yield ("B", action.mb, s)


def produced(schedule: Schedule, rank: int, action: Action) -> list[Unit]:
    """The units `action` completes (BW completes the input gradient and B and W together)."""
    s = schedule.stage(rank, action.chunk)
    if action.kind == "BW":
        return [("BW", action.mb, s), ("grad", action.mb, s), ("B", action.mb, s),
                ("W", action.mb, s)]
    if action.kind == "B":
        return [("B", action.mb, s), ("grad", action.mb, s)]
    return [(action.kind, action.mb, s)]


def validate(schedule: Schedule) -> Schedule:
    """Return `schedule` if it is runnable, else raise ValueError saying what is wrong."""
    p, m, v = schedule.num_stages, schedule.num_microbatches, schedule.chunks
    if len(schedule.ranks) != p:
        raise ValueError(f"schedule has {len(schedule.ranks)} ranks, expected num_stages={p}")
    seen: dict[Unit, int] = {}
    for r, acts in enumerate(schedule.ranks):
        for a in acts:
            if a.kind not in KINDS or not 0 <= a.mb < m or not 0 <= a.chunk < v:
                raise ValueError(f"rank {r}: bad action {a!r} (kinds {KINDS}, mb < {m}, "
                                 f"chunk < {v})")
            key = (a.kind, a.mb, schedule.stage(r, a.chunk))
            if key in seen:
                raise ValueError(f"rank {r}: action {a} appears twice")
            seen[key] = r
    for i in range(m):
        for s in range(schedule.num_virtual):
            r, c = schedule.place(s)
            if ("F", i, s) not in seen:
                raise ValueError(f"rank {r}: forward of microbatch {i} chunk {c} is missing")
            split = ("B", i, s) in seen, ("W", i, s) in seen
            fused = ("BW", i, s) in seen
            if fused == any(split) or split[0] != split[1]:
                raise ValueError(f"rank {r}: microbatch {i} chunk {c} needs exactly one "
                                 f"backward: either BW, or B and W (got BW={fused}, "
                                 f"B={split[0]}, W={split[1]})")
    order(schedule)
    fifo_order(schedule)
    return schedule


def order(schedule: Schedule) -> list[tuple[int, Action]]:
    """A global order in which every rank runs its list and every dependency comes first;
    ValueError naming each rank's blocked action if there is none (a deadlock)."""
    done: set[Unit] = set()
    nxt = [0] * schedule.num_stages
    out: list[tuple[int, Action]] = []
    progress = True
    while progress:
        progress = False
        for r, acts in enumerate(schedule.ranks):
            while nxt[r] < len(acts) and all(
                    d in done for d in dependencies(schedule, r, acts[nxt[r]])):
                done.update(produced(schedule, r, acts[nxt[r]]))
                out.append((r, acts[nxt[r]]))
                nxt[r] += 1
                progress = True
    stuck = [(r, acts[nxt[r]]) for r, acts in enumerate(schedule.ranks) if nxt[r] < len(acts)]
    if stuck:
        waits = "; ".join(
            f"rank {r} waits at {a} for "
            + ", ".join(f"{k}{i}@stage{s}" for k, i, s in dependencies(schedule, r, a)
                        if (k, i, s) not in done)
            for r, a in stuck)
        raise ValueError(f"{schedule.name}: deadlock: {waits}")
    return out


def fifo_order(schedule: Schedule) -> None:
    """NCCL ignores tags and matches each pair's messages in order: check that every rank
    sends to each peer in the order that peer receives. ValueError naming the pair if not."""
    sends: dict[tuple[int, int], list[Unit]] = {}
    recvs: dict[tuple[int, int], list[Unit]] = {}
    last = schedule.num_virtual - 1
    for r, acts in enumerate(schedule.ranks):
        for a in acts:
            s = schedule.stage(r, a.chunk)
            if a.kind == "F" and s < last:  # activation to stage s + 1
                sends.setdefault((r, schedule.place(s + 1)[0]), []).append(("act", a.mb, s + 1))
            if a.kind == "F" and s > 0:
                recvs.setdefault((schedule.place(s - 1)[0], r), []).append(("act", a.mb, s))
            if a.kind in ("B", "BW") and s > 0:  # input gradient to stage s - 1
                sends.setdefault((r, schedule.place(s - 1)[0]), []).append(("grad", a.mb, s - 1))
            if a.kind in ("B", "BW") and s < last:
                recvs.setdefault((schedule.place(s + 1)[0], r), []).append(("grad", a.mb, s))
    for (src, dst), sent in sends.items():
        if src != dst and sent != recvs.get((src, dst)):
            raise ValueError(f"{schedule.name}: rank {src} sends to rank {dst} in an order "
                             f"rank {dst} does not receive in")
