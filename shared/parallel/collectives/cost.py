"""The α-β model of our collectives, busbw as nccl-tests defines it, and published link figures.

A message of m bytes costs α + β·m (Hockney): α the per-message latency, β the seconds per byte
(1/bandwidth). An algorithm's time is the messages and bytes on its critical path, one port per
rank (a rank sends one message and receives one at a time, as our code does):
- ring (Patarasuk & Yuan §3): 2(n-1) steps of S/n bytes:         2(n-1)·α + 2(n-1)/n·S·β
- binary tree, reduce then broadcast, unpipelined (tree.py): at each level a parent takes its
  children one after another, so the path holds `tree_messages(n)` messages of S bytes each;
  the double tree halves S and runs both trees at once, sharing each rank's port.
- halving-doubling (Thakur et al. §4.4) on p = 2^k ranks: 2k messages, 2(p-1)/p·S bytes; a
  non-power-of-two n adds the fold's two full messages.
Tree beats ring only when its α saving outweighs its β loss; with one port and the btree
layout, 4 ranks have 6 messages on the tree's path and 6 on the ring's: no crossover until n=8.

busbw (nccl-tests, doc/PERFORMANCE.md): algbw = S / t; busbw = algbw × the bytes a rank must
move per byte of S under the best algorithm: all-reduce 2(n-1)/n (reduce-scatter (n-1)/n + all-
gather (n-1)/n), reduce-scatter and all-gather (n-1)/n, broadcast and reduce 1. It reads as
"link bandwidth used" only when the algorithm moves the ring's bytes: a tree moves S per level,
and in-network reduction (NVLink SHARP) moves about S per rank, so its busbw reads above the link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.parallel.collectives.tree import btree, children

ALGOS = ("ring", "tree", "double_tree", "halving_doubling")


def tree_messages(n: int) -> int:
    """Messages on the critical path of tree.py's reduce + broadcast over `btree(n)`: the
    reduce reaches a node after its slowest child plus one receive per child, in order."""
    parent = btree(n)
    up = [0] * n  # messages until node r has its subtree's sum

    def reduce_done(r):
        t = 0
        for c in children(parent, r):  # children received in order, each after it is ready
            t = max(t, reduce_done(c)) + 1
        up[r] = t
        return t

    total_up = reduce_done(0)
    down = 0  # broadcast: the k-th child served waits k sends at its parent

    def bcast(r, t):
        nonlocal down
        down = max(down, t)
        for k, c in enumerate(children(parent, r), start=1):
            bcast(c, t + k)

    bcast(0, 0)
    return total_up + down


def path(algo: str, n: int, nbytes: float) -> tuple[float, float]:
    """(messages, bytes) on the critical path of one all-reduce of `nbytes` on n ranks."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return 0.0, 0.0
    if algo == "ring":
        return 2 * (n - 1), 2 * (n - 1) / n * nbytes
    if algo in ("tree", "double_tree"):  # the double tree's two half-size trees share a port
        m = tree_messages(n)
        return m, m * nbytes
    if algo == "halving_doubling":
        p = 1 << (n.bit_length() - 1)
        k, fold = p.bit_length() - 1, (n != p)
        return 2 * k + 2 * fold, 2 * (p - 1) / p * nbytes + 2 * fold * nbytes
    raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")


@dataclass(frozen=True)
class Fit:
    alpha_s: float      # seconds per message
    beta_s_per_b: float  # seconds per byte
    rel_rms: float      # RMS relative error of the fit on its own points

    @property
    def bandwidth(self) -> float:
        return 1 / self.beta_s_per_b

    def predict(self, algo: str, n: int, nbytes: float) -> float:
        m, b = path(algo, n, nbytes)
        return m * self.alpha_s + b * self.beta_s_per_b


def fit(points: list[tuple[str, int, float, float]]) -> Fit:
    """Least squares on relative error (each point weighted 1/t, so 4-byte and 4-MB points
    count alike) of t = messages·α + bytes·β over (algo, n, nbytes, seconds) points."""
    if len(points) < 2:
        raise ValueError(f"points must hold at least 2 measurements, got {len(points)}")
    a = np.array([path(al, n, s) for al, n, s, _ in points], dtype=float)
    t = np.array([p[3] for p in points], dtype=float)
    if not (t > 0).all():
        raise ValueError("every measured time must be positive")
    w = 1 / t
    (alpha, beta), *_ = np.linalg.lstsq(a * w[:, None], np.ones_like(t), rcond=None)
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"fit gave non-positive alpha={alpha:.3g} or beta={beta:.3g}: the "
                         f"sweep needs both small (latency) and large (bandwidth) sizes")
    pred = a @ np.array([alpha, beta])
    return Fit(float(alpha), float(beta), float(np.sqrt(np.mean((pred / t - 1) ** 2))))


def crossover(algo_a: str, algo_b: str, n: int, alpha: float, beta: float) -> float | None:
    """Bytes below which `algo_a` beats `algo_b` (fewer α, more β), or None if one wins at
    every size. From m_a·α + k_a·S·β = m_b·α + k_b·S·β with path() linear in S."""
    (ma, ka), (mb, kb) = path(algo_a, n, 1.0), path(algo_b, n, 1.0)
    if ma >= mb or ka <= kb:
        return None
    return (mb - ma) * alpha / ((ka - kb) * beta)


BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
}


def algbw(nbytes: float, seconds: float) -> float:
    return nbytes / seconds


def busbw(op: str, n: int, nbytes: float, seconds: float) -> float:
    """nccl-tests' bus bandwidth: algbw × BUS_FACTOR[op](n)."""
    if op not in BUS_FACTOR:
        raise ValueError(f"op must be one of {sorted(BUS_FACTOR)}, got {op!r}")
    return algbw(nbytes, seconds) * BUS_FACTOR[op](n)


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per direction per GPU
    alpha_s: float    # per-message latency: an assumption, see `source`
    source: str


# Predictions only: datasheet bandwidths; the latencies are assumed orders of magnitude
# (NCCL's per-step latency on NVLink is ~1 µs, across InfiniBand several µs), not measurements.
LINKS = {
    "H100 NVLink4": Link("H100 NVLink4", 450e9, 1e-6,
                         "NVIDIA H100 SXM datasheet: 900 GB/s NVLink per GPU, both directions"),
    "NDR InfiniBand": Link("NDR InfiniBand", 50e9, 5e-6,
                           "ConnectX-7: 400 Gb/s NDR per port, one port per H100 (DGX H100)"),
}


def link_time(algo: str, n: int, nbytes: float, link: str) -> float:
    """Predicted seconds of one all-reduce on `link` (α-β with the link's figures)."""
    lk = LINKS[link]
    m, b = path(algo, n, nbytes)
    return m * lk.alpha_s + b / lk.bandwidth


def log_sizes(lo: int, hi: int, per_decade: int = 3) -> list[int]:
    """Byte sizes from lo to hi, evenly spaced in log, multiples of 4 (fp32 elements)."""
    k = max(2, round(math.log10(hi / lo) * per_decade) + 1)
    return sorted({max(4, int(round(x / 4)) * 4) for x in np.geomspace(lo, hi, k)})
