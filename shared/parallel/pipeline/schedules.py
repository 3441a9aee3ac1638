"""Pipeline schedules as data: for each rank, the ordered list of actions it runs.

An action is ``F`` (forward), ``B`` (backward for the input: the activation gradient sent
upstream), ``W`` (backward for the weights) or ``BW`` (both halves at once, as every schedule
before Zero Bubble runs them) of one microbatch on one model chunk. With ``chunks = v`` the
model is cut into ``p * v`` virtual stages and rank ``r`` holds stages ``r, r + p, ...``
(Megatron-LM's interleaved assignment, Narayanan et al. 2021 §2.2); chunk ``c`` of rank ``r``
is virtual stage ``c * p + r``.

    gpipe             all forwards, then all backwards (Huang et al. 2019, Fig. 2c)
    1f1b              PipeDream-Flush: warm-up, one-forward-one-backward, cool-down
                      (Narayanan et al. 2021a, Fig. 4)
    interleaved-1f1b  1F1B over v chunks per rank: bubble / v (Narayanan et al. 2021b, Fig. 4)
    zb-h1             Zero Bubble H1: B and W split, W deferred into the cool-down bubble,
                      1F1B's memory (Qi et al. 2024, §3.1, Fig. 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

KINDS = ("F", "B", "W", "BW")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


class Action(NamedTuple):
    kind: str  # one of KINDS
    mb: int  # microbatch index, 0..m-1
    chunk: int = 0  # model chunk on this rank, 0..v-1

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class Schedule:
    name: str
    num_stages: int  # p: ranks
    num_microbatches: int  # m
    chunks: int  # v: model chunks per rank
    ranks: tuple[tuple[Action, ...], ...]  # ranks[r] = rank r's actions, in order

    @property
    def num_virtual(self) -> int:
        return self.num_stages * self.chunks

    def stage(self, rank: int, chunk: int) -> int:
        """Virtual stage of `chunk` on `rank` (Megatron's round-robin assignment)."""
        return chunk * self.num_stages + rank

    def place(self, stage: int) -> tuple[int, int]:
        """(rank, chunk) holding virtual `stage`."""
        return stage % self.num_stages, stage // self.num_stages

    def __str__(self) -> str:
        rows = [f"{self.name}: p={self.num_stages} m={self.num_microbatches} v={self.chunks}"]
        rows += [f"  rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.ranks)]
        return "\n".join(rows)


def make_schedule(name: str, num_stages: int, num_microbatches: int, *,
                  chunks: int = 1) -> Schedule:
    """The schedule `name` for p = `num_stages` ranks, m = `num_microbatches`, v = `chunks`."""
    for arg, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                       ("chunks", chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    if name not in SCHEDULES:
        raise ValueError(f"name must be one of {SCHEDULES}, got {name!r}")
    p, m, v = num_stages, num_microbatches, chunks
    if name != "interleaved-1f1b" and v != 1:
        raise ValueError(f"{name} runs one chunk per rank: chunks must be 1, got {v}")
    if name == "interleaved-1f1b" and m % p:
        # Megatron's ordering walks microbatches in groups of p per chunk (§2.2).
        raise ValueError(f"interleaved-1f1b needs num_microbatches to be a multiple of "
                         f"num_stages: got m={m}, p={p}")
    build = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "interleaved-1f1b": _interleaved,
             "zb-h1": _zb_h1}[name]
    ranks = tuple(tuple(build(r, p, m, v)) for r in range(p))
    return Schedule(name, p, m, v, ranks)


def _gpipe(r: int, p: int, m: int, v: int) -> list[Action]:
    """Every forward, then every backward: m activations stashed at the flush."""
    return [Action("F", i) for i in range(m)] + [Action("BW", i) for i in range(m)]


def _one_f_one_b(r: int, p: int, m: int, v: int) -> list[Action]:
    """Warm-up of p - r - 1 forwards, then alternate F and BW, then drain the backwards.
    Rank r never holds more than p - r activations."""
    warmup = min(p - r - 1, m)
    acts = [Action("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: 1F1B
        acts += [Action("F", warmup + i), Action("BW", i)]
    acts += [Action("BW", i) for i in range(m - warmup, m)]  # cool-down
    return acts


def _interleaved(r: int, p: int, m: int, v: int) -> list[Action]:
    """1F1B over (microbatch, chunk) units in Megatron's order: p microbatches through chunk
    0, the same p through chunk 1, ..., then the next p. Backwards walk the chunks in reverse.
    Warm-up: 2 (p - r - 1) + (v - 1) p units (all of them when m == p)."""
    total = m * v

    def unit(k: int, backward: bool) -> tuple[int, int]:
        group, within = divmod(k, p * v)
        chunk = within // p
        return group * p + within % p, (v - 1 - chunk) if backward else chunk

    warmup = total if m == p else min(2 * (p - r - 1) + (v - 1) * p, total)
    acts = [Action("F", *unit(k, False)) for k in range(warmup)]
    for k in range(total - warmup):
        acts += [Action("F", *unit(warmup + k, False)), Action("BW", *unit(k, True))]
    acts += [Action("BW", *unit(k, True)) for k in range(total - warmup, total)]
    return acts


def _zb_h1(r: int, p: int, m: int, v: int) -> list[Action]:
    """ZB-H1 (Qi et al. 2024, §3.1, Fig. 3 top): 1F1B with the backward split into B and W.
    B stays on the critical path (it feeds the rank upstream); W feeds nobody, so rank r holds
    its first r W's back and spends them in the cool-down, where 1F1B waits for gradients.
    Every rank then holds at most p activations: 1F1B's peak (rank 0's), now on every rank.
    With f = b = w and m >= p the bubble is (p - 1)(f + b - w), a third of 1F1B's."""
    warmup = min(p - r - 1, m)
    acts = [Action("F", i) for i in range(warmup)]
    w_next = 0
    for i in range(m - warmup):  # steady: F, B, and one W once r of them are held back
        acts += [Action("F", warmup + i), Action("B", i)]
        if i >= r:
            acts.append(Action("W", w_next))
            w_next += 1
    for i in range(m - warmup, m):  # cool-down: each B, then the oldest held-back W
        acts += [Action("B", i), Action("W", w_next)]
        w_next += 1
    return acts + [Action("W", i) for i in range(w_next, m)]
