"""Timing that can be trusted: warm-up, exactly `repeat` timed calls, raw samples kept.

- Torch on a GPU: CUDA events around each call, L2 flushed before it (as Triton's `do_bench`
  does), one synchronize after the last call; nothing synchronises inside the timed region.
- JAX (any device): the wall clock around the call and `jax.block_until_ready` of its output,
  because JAX's work is async and runs on streams that torch's events do not see.
- Anything else on a CPU: the wall clock around each call.

`compare` interleaves its contenders round by round, so drift hits them alike, and `ratio`
turns two of its timings into a median ratio with a bootstrap 95% interval over the paired
rounds: a timing verdict reads that interval (docs/claims.md, "Measuring honestly").
`one_thread` pins torch to one CPU thread around a timing (docs/cpu-notes.md). On a GPU,
`spin_up` raises the clocks before the first timing and `graphed` replays a call from a CUDA
graph, so a second `compare` of the replays times the device alone, without the Python path.
Timings are never test assertions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from kernels.device import INTERPRET, gpu_available

L2_FLUSH_BYTES = 256 * 2**20  # larger than any L2 to date (H100: 50 MB), as in do_bench


@dataclass(frozen=True)
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    repeat: int
    method: str
    samples: tuple[float, ...] = ()  # seconds, one per timed call, in call order

    def __str__(self) -> str:
        return (f"{self.median_s * 1e3:.3f} ms (p20 {self.p20_s * 1e3:.3f}, "
                f"p80 {self.p80_s * 1e3:.3f}; {self.method})")


@dataclass(frozen=True)
class Ratio:
    """median(a) / median(b) over paired rounds, with a bootstrap percentile interval."""
    median: float
    low: float
    high: float
    n: int
    confidence: float
    a: tuple[float, ...]
    b: tuple[float, ...]

    def __str__(self) -> str:
        return (f"{self.median:.3g}x [{self.low:.3g}, {self.high:.3g}] "
                f"({self.confidence:.0%} bootstrap, {self.n} rounds)")


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]
    return statistics.median(s), q(0.2), q(0.8)


def _timing(samples: list[float], method: str) -> Timing:
    return Timing(*_quantiles(samples), len(samples), method, tuple(samples))


def _jax_leaves(out) -> list:
    """The JAX arrays in a call's output (one array, or a tuple/list/dict of them)."""
    if hasattr(out, "block_until_ready"):
        return [out]
    if isinstance(out, (tuple, list)):
        return [leaf for o in out for leaf in _jax_leaves(o)]
    if isinstance(out, dict):
        return [leaf for o in out.values() for leaf in _jax_leaves(o)]
    return []


def _block(out) -> None:
    leaves = _jax_leaves(out)
    if leaves:
        import jax

        jax.block_until_ready(leaves)


def _flush_buffer():
    """What `zero_()` before each call writes to evict L2 (one per measure/compare call)."""
    if gpu_available() and not INTERPRET:
        import torch

        return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return None


class _Timer:
    """Times single calls of one function; on a GPU with torch, with CUDA events that are read
    only after the last call (`samples()`), so no call waits for the device."""

    def __init__(self, fn: Callable[[], object], flush=None):
        self.fn, self.flush = fn, flush
        self.events = gpu_available() and not INTERPRET
        # Triton's interpreter on a GPU machine: the host clock needs the device finished
        self.host_sync = gpu_available() and INTERPRET
        self.jax = False      # set by the first call whose output holds JAX arrays
        self.wall: list[float] = []
        self.pairs: list = []
        if self.events or self.host_sync:
            import torch

            self.torch = torch

    def _call(self) -> None:
        out = self.fn()
        self.jax = self.jax or bool(_jax_leaves(out))
        _block(out)  # JAX is async: its work is done only when its outputs are ready
        if self.host_sync:
            self.torch.cuda.synchronize()

    def warm(self) -> None:
        self._call()
        if self.events:
            self.torch.cuda.synchronize()  # outside the timed region: warm-up work finished

    def timed(self) -> None:
        events = self.events and not self.jax  # JAX runs on its own streams: wall clock only
        if events:
            self.flush.zero_()  # cold L2 for every call, queued before the start event
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        self._call()
        self.wall.append(time.perf_counter() - t0)
        if events:
            end.record()
            self.pairs.append((start, end))

    def samples(self) -> tuple[list[float], str]:
        if self.jax:
            return self.wall, "wall clock, jax.block_until_ready"
        if self.events:
            self.torch.cuda.synchronize()  # after the last call: the events have fired
            return ([s.elapsed_time(e) / 1e3 for s, e in self.pairs],
                    "CUDA events, L2 flushed")
        return self.wall, "wall clock"


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while inside, its previous count restored after: on a CPU shared
    with other jobs, two OpenMP threads spin against each other and a 0.3 s step took 3-15 s
    (docs/cpu-notes.md); one does not."""
    import torch  # here, not at the top: timing JAX code must not load torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spin_up(seconds: float = 0.5) -> None:
    """Keep the GPU busy before the first timing: the H200 of the first run idled at 345 MHz
    (1980 under load), and its first rows were timed within milliseconds of starting."""
    import torch

    buf = torch.empty(2**28, dtype=torch.int8, device="cuda")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        buf.zero_()
        torch.cuda.synchronize()


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured once in a CUDA graph; the replay launches the same kernels without the
    Python launch path, so its timing is device time alone. `fn` runs once outside the capture
    first (compiles, caches); one that syncs with the host cannot be captured and raises."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _check_counts(warmup: int, repeat: int) -> None:
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, got {warmup=} {repeat=}")


def measure(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 10) -> Timing:
    """Time `fn()` (no arguments: close over the inputs): `warmup` untimed calls, then exactly
    `repeat` timed ones. Never time on zeros."""
    _check_counts(warmup, repeat)
    timer = _Timer(fn, _flush_buffer())
    for _ in range(warmup):
        timer.warm()
    for _ in range(repeat):
        timer.timed()
    samples, how = timer.samples()
    return _timing(samples, f"{how}, median of {repeat}")


def compare(fns: dict[str, Callable[[], object]], *, warmup: int = 1,
            repeat: int = 10) -> dict[str, Timing]:
    """Time several functions interleaved round by round, so drift hits them alike; sample i
    of every timing comes from round i (what `ratio` pairs)."""
    if not fns:
        raise ValueError("fns must name at least one function")
    _check_counts(warmup, repeat)
    flush = _flush_buffer()
    timers = {name: _Timer(f, flush) for name, f in fns.items()}
    for _ in range(warmup):
        for t in timers.values():
            t.warm()
    for _ in range(repeat):
        for t in timers.values():
            t.timed()
    out = {}
    for name, t in timers.items():
        samples, how = t.samples()
        out[name] = _timing(samples, f"{how}, interleaved, median of {repeat}")
    return out


def ratio(a: Timing | Sequence[float], b: Timing | Sequence[float], *, resamples: int = 2000,
          confidence: float = 0.95, seed: int = 0) -> Ratio:
    """median(a) / median(b), e.g. `ratio(t["safe"], t["online"])` is online's speed-up.

    a and b are paired round by round (from one `compare`); the interval resamples the rounds
    with replacement, keeping the pairs, and takes the percentile interval of the resampled
    ratios. Seeded, so a re-read of the same samples gives the same interval."""
    xa = np.asarray(a.samples if isinstance(a, Timing) else a, dtype=float)
    xb = np.asarray(b.samples if isinstance(b, Timing) else b, dtype=float)
    if xa.ndim != 1 or xa.shape != xb.shape or len(xa) < 2:
        raise ValueError(f"a and b must hold the same number (>= 2) of paired samples, got "
                         f"{xa.shape} and {xb.shape} (a Timing from measure/compare keeps them)")
    if not (np.isfinite(xa).all() and np.isfinite(xb).all() and (xb > 0).all()):
        raise ValueError("a and b must be finite times, b positive")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    idx = np.random.default_rng(seed).integers(0, len(xa), size=(resamples, len(xa)))
    boot = np.median(xa[idx], axis=1) / np.median(xb[idx], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return Ratio(float(np.median(xa) / np.median(xb)), float(low), float(high), len(xa),
                 confidence, tuple(xa.tolist()), tuple(xb.tolist()))
