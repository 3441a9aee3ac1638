"""Timing that can be trusted: warm-up, repeats, median, the device synchronised.

On a GPU, Triton's `do_bench` (CUDA events, L2 flushed between runs); on a CPU, the wall clock
around each call. Results are records, so labs can print, plot and file them as claims.
Timings are never test assertions (DESIGN.md): a ratio measured in one run is what we report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from kernels.device import INTERPRET, gpu_available


@dataclass(frozen=True)
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    repeat: int
    method: str

    def __str__(self) -> str:
        return (f"{self.median_s * 1e3:.3f} ms (p20 {self.p20_s * 1e3:.3f}, "
                f"p80 {self.p80_s * 1e3:.3f}; {self.method})")


def _synced(fn: Callable) -> Callable:
    """Call fn and wait for the device: jax arrays block, CUDA streams synchronise."""

    def run():
        out = fn()
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        elif isinstance(out, (tuple, list)):
            for o in out:
                if hasattr(o, "block_until_ready"):
                    o.block_until_ready()
        if gpu_available():
            import torch

            torch.cuda.synchronize()
        return out

    return run


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]
    return statistics.median(s), q(0.2), q(0.8)


def measure(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 10) -> Timing:
    """Time `fn()` (no arguments: close over the inputs); never time on zeros."""
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, got {warmup=} {repeat=}")
    run = _synced(fn)
    if gpu_available() and not INTERPRET:
        from triton.testing import do_bench

        med, p20, p80 = do_bench(run, quantiles=[0.5, 0.2, 0.8])
        return Timing(med / 1e3, p20 / 1e3, p80 / 1e3, repeat, "triton do_bench, CUDA events")
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
    return Timing(*_quantiles(samples), repeat, f"wall clock, median of {repeat}")


def compare(fns: dict[str, Callable[[], object]], *, warmup: int = 1,
            repeat: int = 10) -> dict[str, Timing]:
    """Time several functions interleaved round by round, so drift hits them alike."""
    if not fns:
        raise ValueError("fns must name at least one function")
    runs = {name: _synced(f) for name, f in fns.items()}
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t0)
    method = f"wall clock, interleaved, median of {repeat}"
    return {name: Timing(*_quantiles(s), repeat, method) for name, s in samples.items()}
