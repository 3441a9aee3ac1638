"""ZeRO's arithmetic: the paper's memory and traffic formulas, and what our engine should
measure (the same formulas with its padding and its one exception, the root unit).

Memory per device (Rajbhandari et al. 2020, §3.1 and Figure 1), mixed-precision Adam:
2Ψ bytes of fp16 parameters, 2Ψ of fp16 gradients, KΨ of optimizer states (K = 12: fp32
master, momentum, variance), each either replicated or divided by Nd by the stage.
Traffic per device per step (§7): DP's all-reduce is a reduce-scatter plus an all-gather,
2Ψ elements; ZeRO-1/2 move the same; ZeRO-3 gathers the parameters twice (forward and
backward) and reduce-scatters the gradients once, 3Ψ. A ring moves (Nd - 1)/Nd of each.
"""

from __future__ import annotations

GB = 1e9
K_ADAM = 12
STAGE_NAMES = {0: "DDP (baseline)", 1: "ZeRO-1 (P_os)", 2: "ZeRO-2 (P_os+g)",
               3: "ZeRO-3 (P_os+g+p)"}
FIGURE_1 = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}  # GB: Ψ = 7.5B, Nd = 64, K = 12


def paper_bytes(stage: int, psi: float, nd: int, k: int = K_ADAM) -> dict[str, float]:
    """Per-device model-state bytes of Figure 1: params, grads, optimizer (2, 2, K bytes
    per parameter, the sharded ones divided by Nd)."""
    if stage not in FIGURE_1:
        raise ValueError(f"stage must be 0-3, got {stage!r}")
    if nd < 1:
        raise ValueError(f"nd must be >= 1, got {nd!r}")
    return {"params": 2 * psi / (nd if stage >= 3 else 1),
            "grads": 2 * psi / (nd if stage >= 2 else 1),
            "optimizer": k * psi / (nd if stage >= 1 else 1)}


def paper_traffic(stage: int, psi: float) -> float:
    """Elements each device moves per step in the paper's accounting (§7): 2Ψ or 3Ψ."""
    return 3 * psi if stage == 3 else 2 * psi


def engine_traffic(stage: int, padded: list[int], nd: int, itemsize: int) -> int:
    """Bytes one rank sends per step in our engine with ring collectives: `padded` are the
    units' padded sizes, root first. As the paper, except that ZeRO-3 gathers the root (the
    tied embedding/head, used first and last) once per step, not twice."""
    ring = lambda n: (nd - 1) * n // nd * itemsize  # one reduce-scatter or all-gather
    if stage == 3:
        return sum(ring(n) * (2 if i == 0 else 3) for i, n in enumerate(padded))
    return sum(2 * ring(n) for n in padded)


def fit_replicated_sharded(nds: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of value = a + b / Nd: the replicated and the sharded part of a
    measured per-rank byte count, read off the runs at several Nd."""
    n = len(nds)
    if n < 2 or len(values) != n:
        raise ValueError("need values at two or more Nd")
    xs = [1 / d for d in nds]
    mx, my = sum(xs) / n, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, values, strict=True)) / sxx
    return my - b * mx, b
