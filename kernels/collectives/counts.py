"""Steps and bytes of the fused kernels against the unfused sequences, counted per device.

A "step" is one dependent round on the critical path: a communication round (ring hop or DMA
wave) or a compute block that must wait for one. HBM bytes are the activations written and read
back between the collective and the op that follows (what fusion removes); wire bytes are what
leaves the device.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counts:
    steps_unfused: int
    steps_fused: int
    wire_bytes_unfused: int
    wire_bytes_fused: int
    hbm_bytes_unfused: int   # the intermediate written to HBM and read back
    hbm_bytes_fused: int
    flops_unfused: int
    flops_fused: int


def ag_matmul_counts(n: int, m: int, k: int, f: int, itemsize: int) -> Counts:
    """Both tile the matmul by source chunk (n blocks of m rows). Unfused: n-1 ring hops, then
    the n blocks: 2n-1 rounds in sequence. Fused: n rounds, hop s under block s, each round
    max(hop, block). The gathered x (n·m·k) is written to HBM and read back unfused; fused it
    never leaves VMEM. Wire bytes and FLOPs are the same: fusion hides, it does not remove."""
    chunk = m * k * itemsize
    return Counts(steps_unfused=(n - 1) + n, steps_fused=n,
                  wire_bytes_unfused=(n - 1) * chunk, wire_bytes_fused=(n - 1) * chunk,
                  hbm_bytes_unfused=2 * n * chunk, hbm_bytes_fused=0,
                  flops_unfused=2 * n * m * k * f, flops_fused=2 * n * m * k * f)


def allreduce_softmax_counts(n: int, m: int, v: int, itemsize: int) -> Counts:
    """psum (direct: reduce-scatter wave + all-gather wave) then softmax on all m rows on every
    device, vs reduce-scatter wave, softmax of m/n rows, all-gather wave. Wire bytes equal; the
    reduced logits' HBM round trip goes; softmax work per device falls n-fold (~5 flops per
    element: max, subtract, exp, sum, divide)."""
    chunk = (m // n) * v * itemsize
    return Counts(steps_unfused=3, steps_fused=3,
                  wire_bytes_unfused=2 * (n - 1) * chunk, wire_bytes_fused=2 * (n - 1) * chunk,
                  hbm_bytes_unfused=2 * m * v * itemsize, hbm_bytes_fused=0,
                  flops_unfused=5 * m * v, flops_fused=5 * (m // n) * v)
