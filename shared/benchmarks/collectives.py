"""Collectives: the runs behind the lab, and `kclub bench collectives`.

One `launch.spawn` per world size (2 and 4 ranks) runs everything on those ranks, because
starting processes costs more than the runs:
- a size sweep of every all-reduce (ours: ring, tree, double tree, halving-doubling; gloo's
  own), interleaved round by round so drift hits them alike; a call's time is its slowest
  rank's, barrier to return. An untimed warm-up round checks every result against gloo's and
  counts the bytes each rank sends.
- on 2 ranks, the DDP-style bucketed backward with and without overlap, alternating.
On this CPU the ranks share two cores and talk through loopback TCP: α here is a kernel round
trip (tens of µs), not a NIC's. Nothing is emulated in the sweep; the overlap's compute is
(overlap.py says how).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shared.benchmarks import record
from shared.device import pick
from shared.parallel import collectives, comm_log, launch
from shared.parallel.collectives import cost, overlap

ALGOS = {
    "ring": collectives.ring_all_reduce,
    "tree": collectives.tree_all_reduce,
    "double_tree": collectives.double_tree_all_reduce,
    "halving_doubling": collectives.halving_doubling_all_reduce,
    "gloo": dist.all_reduce,
}
# up to 4 MB: below that, beta hides under alpha on this CPU
SIZES = pick(ci=cost.log_sizes(4, 2**22, 1), full=cost.log_sizes(4, 2**26, 3))
ROUNDS = pick(ci=9, full=15)  # timed rounds per size (the sweep is cheap; starting ranks is not)


@dataclass(frozen=True)
class OverlapJob:
    layers: int = 8
    dim: int = pick(ci=256, full=1024)      # each layer a dim x dim weight (fp32)
    tokens: int = 64
    slot_s: float = pick(ci=0.01, full=0.02)  # emulated backward per layer
    bucket_layers: int = 2                  # bucket cap, in layers' worth of gradient
    rounds: int = pick(ci=6, full=10)       # alternating no-overlap / overlap steps


@dataclass
class Result:
    n: int
    sizes: list[int]
    times: dict[tuple[str, int], list[float]]  # per round, the slowest rank's seconds
    max_rel_err: dict[str, float]               # vs gloo's result, over sizes (warm-up round)
    sent: list[dict[tuple[str, int], int]]      # per rank: bytes sent by ours (gloo's: 0)
    overlap: dict = field(default_factory=dict)


def _sweep(sizes: list[int], rounds: int) -> tuple[dict, dict, dict]:
    """Round 0 is the warm-up: untimed, it checks every result against gloo's and counts the
    bytes this rank sends (comm_log); rounds 1..rounds are timed."""
    rank = dist.get_rank()
    times: dict[tuple[str, int], list[float]] = {}
    sent: dict[tuple[str, int], int] = {}
    err: dict[str, float] = {a: 0.0 for a in ALGOS}
    for size in sizes:
        g = torch.Generator().manual_seed(size * 7 + rank)
        x = torch.randn(size // 4, generator=g)  # fresh per size and rank
        for r in range(rounds + 1):
            outs = {}
            for name, fn in ALGOS.items():
                t = x.clone()
                dist.barrier()
                with comm_log.recording() as log:
                    t0 = time.perf_counter()
                    fn(t)
                    dt = time.perf_counter() - t0
                if r:
                    times.setdefault((name, size), []).append(dt)
                else:
                    sent[(name, size)] = log.bytes()
                    outs[name] = t
            if r == 0:
                ref = outs["gloo"].double()
                for name, t in outs.items():
                    e = (t.double() - ref).norm() / ref.norm().clamp_min(1e-30)
                    err[name] = max(err[name], float(e))
    return times, err, sent


def _overlap(job: OverlapJob) -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    acts = [torch.randn(job.tokens, job.dim, generator=g) for _ in range(job.layers)]
    douts = [torch.randn(job.tokens, job.dim, generator=g) for _ in range(job.layers)]
    buckets = overlap.bucket_plan([job.dim * job.dim] * job.layers, job.bucket_layers * job.dim**2)
    steps: dict[str, list[float]] = {"no overlap": [], "overlap": []}
    spans = {}
    for _ in range(job.rounds):
        for mode in ("no overlap", "overlap"):
            dist.barrier()
            t0 = time.perf_counter()
            grads, sp = overlap.backward_step(acts, douts, buckets, job.slot_s, n,
                                              overlap=mode == "overlap")
            steps[mode].append(time.perf_counter() - t0)
            spans[mode] = sp
    want = [a.T @ d for a, d in zip(acts, douts, strict=True)]  # this rank's own gradients
    for w in want:
        dist.all_reduce(w)
        w /= n
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads, want, strict=True))
    return {"steps": steps, "spans": spans, "max_rel_err": err, "buckets": buckets}


def worker(sizes: list[int], rounds: int, job: OverlapJob | None) -> dict:
    times, err, sent = _sweep(sizes, rounds)
    return {"times": times, "err": err, "sent": sent, "overlap": _overlap(job) if job else {}}


def run(n: int, sizes: list[int] = SIZES, rounds: int = ROUNDS, job: OverlapJob | None = None,
        timeout_s: float = 600) -> Result:
    per_rank = launch.spawn(worker, n, sizes, rounds, job, timeout_s=timeout_s)
    times = {k: [max(r["times"][k][i] for r in per_rank) for i in range(rounds)]
             for k in per_rank[0]["times"]}
    err = {a: max(r["err"][a] for r in per_rank) for a in ALGOS}
    ov = {}
    if job:
        steps = {m: [max(r["overlap"]["steps"][m][i] for r in per_rank) for i in range(job.rounds)]
                 for m in per_rank[0]["overlap"]["steps"]}
        ov = {"steps": steps, "spans": [r["overlap"]["spans"] for r in per_rank],
              "max_rel_err": max(r["overlap"]["max_rel_err"] for r in per_rank),
              "buckets": per_rank[0]["overlap"]["buckets"]}
    return Result(n, list(sizes), times, err, [r["sent"] for r in per_rank], ov)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def medians(res: Result, algo: str) -> list[float]:
    return [median(res.times[(algo, s)]) for s in res.sizes]


def fit_points(results: list[Result], algos=("ring",)) -> list[tuple[str, int, float, float]]:
    """(algo, n, bytes, median seconds) of the given algorithms, for `cost.fit`."""
    return [(a, r.n, s, median(r.times[(a, s)])) for r in results for a in algos
            for s in r.sizes]


def measured_crossover(res: Result, a: str, b: str) -> float | None:
    """The first size (bytes) at which `b` becomes faster than `a`, by medians, having been
    slower below; None if no change of sign in the sweep."""
    ta, tb = medians(res, a), medians(res, b)
    for i in range(1, len(res.sizes)):
        if ta[i - 1] <= tb[i - 1] and ta[i] > tb[i]:
            return res.sizes[i]
    return None


def main() -> None:
    job = OverlapJob()
    for n in (2, 4):
        res = run(n, job=job if n == 2 else None)
        for a in ALGOS:
            for s, t in zip(res.sizes, medians(res, a), strict=True):
                record("collectives", {"n": n, "algo": a, "bytes": s, "median_s": t,
                                       "busbw_GBps": cost.busbw("all_reduce", n, s, t) / 1e9})
        if res.overlap:
            for m, st in res.overlap["steps"].items():
                record("overlap", {"mode": m, "median_s": median(st)})


if __name__ == "__main__":
    main()
