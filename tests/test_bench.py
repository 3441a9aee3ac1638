"""shared/bench.py: exactly `repeat` timed calls, nothing synchronised inside the timed region,
JAX outputs waited for, and a bootstrap interval on ratios that covers the truth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from shared import bench


def counting(log, name="f", out=None):
    def fn():
        log.append(name)
        return out
    return fn


def test_measure_and_compare_on_cpu():
    t = bench.measure(lambda: sum(range(1000)), warmup=1, repeat=5)
    assert 0 < t.p20_s <= t.median_s <= t.p80_s and t.repeat == 5 and "wall clock" in t.method
    assert len(t.samples) == 5 and t.median_s == float(np.median(t.samples))
    res = bench.compare({"short": lambda: sum(range(100)), "long": lambda: sum(range(10**5))},
                        repeat=5)
    assert set(res) == {"short", "long"} and all(len(r.samples) == 5 for r in res.values())
    assert res["long"].median_s > res["short"].median_s


@pytest.mark.parametrize("warmup, repeat", [(0, 1), (2, 7), (3, 3)])
def test_repeat_is_honoured(warmup, repeat):
    log = []
    t = bench.measure(counting(log), warmup=warmup, repeat=repeat)
    assert len(log) == warmup + repeat and t.repeat == len(t.samples) == repeat


def test_compare_interleaves_round_by_round():
    log = []
    bench.compare({"a": counting(log, "a"), "b": counting(log, "b")}, warmup=1, repeat=3)
    assert log == ["a", "b"] * 4


@pytest.mark.parametrize("bad", [dict(repeat=0), dict(warmup=-1)])
def test_bad_counts(bad):
    with pytest.raises(ValueError, match="repeat >= 1"):
        bench.measure(lambda: None, **bad)
    with pytest.raises(ValueError, match="repeat >= 1"):
        bench.compare({"x": lambda: None}, **bad)
    with pytest.raises(ValueError, match="fns"):
        bench.compare({})


def test_jax_outputs_are_waited_for_inside_the_timed_region(monkeypatch):
    waited = []
    real = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waited.append(len(x)) or real(x))
    x = jnp.ones((64, 64))
    t = bench.measure(lambda: (x @ x, {"y": x + 1}), warmup=1, repeat=4)
    assert waited == [2] * 5      # every call, both arrays, warm-up included
    assert "block_until_ready" in t.method
    waited.clear()
    bench.measure(lambda: torch.ones(3), warmup=1, repeat=2)
    assert waited == []           # torch outputs are not JAX's business


class FakeEvent:
    def __init__(self, log, enable_timing):
        assert enable_timing
        self.log, self.t = log, None

    def record(self):
        self.t = len(self.log)
        self.log.append("record")

    def elapsed_time(self, end):
        assert "sync" in self.log[end.t:], "events read before the device finished"
        return 2.5  # ms


def test_gpu_path_uses_events_and_never_syncs_inside(monkeypatch):
    """The CUDA path, driven on a CPU with torch.cuda's events and synchronize faked."""
    log = []
    monkeypatch.setattr(bench, "gpu_available", lambda: True)
    monkeypatch.setattr(bench, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing: FakeEvent(log, enable_timing))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))

    class Flush:
        def zero_(self):
            log.append("flush")

    monkeypatch.setattr(torch, "empty", lambda *a, **k: Flush())
    t = bench.measure(counting(log, "call", torch.zeros(1)), warmup=2, repeat=3)
    assert log == ["call", "sync"] * 2 + ["flush", "record", "call", "record"] * 3 + ["sync"]
    assert t.samples == (2.5e-3,) * 3 and "CUDA events" in t.method
    log.clear()
    res = bench.compare({"a": counting(log, "a"), "b": counting(log, "b")}, warmup=0, repeat=2)
    timed = ["flush", "record", "a", "record", "flush", "record", "b", "record"]
    assert log == timed * 2 + ["sync", "sync"]
    assert all("CUDA events" in r.method for r in res.values())


def test_ratio_interval_covers_the_truth():
    # 200 experiments, lognormal noise, true ratio 1.5: the 95% interval should cover it in
    # most of them (percentile bootstrap of a median is a little narrow at n=20).
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(200):
        b = np.exp(rng.normal(0, 0.1, 20))
        a = 1.5 * np.exp(rng.normal(0, 0.1, 20))
        r = bench.ratio(a, b, resamples=1000)
        assert r.low <= r.median <= r.high and r.n == 20
        covered += r.low <= 1.5 <= r.high
    assert 0.85 * 200 <= covered <= 0.995 * 200, covered


def test_ratio_from_timings_keeps_samples_and_is_seeded():
    a = bench.Timing(0.2, 0.1, 0.3, 3, "m", (0.1, 0.2, 0.3))
    b = bench.Timing(0.1, 0.1, 0.1, 3, "m", (0.1, 0.1, 0.1))
    r = bench.ratio(a, b)
    assert r.median == pytest.approx(2.0) and r.a == a.samples and r.b == b.samples
    assert bench.ratio(a, b) == r and "bootstrap" in str(r)
    same = bench.ratio([1.0, 1.1, 0.9, 1.05] * 5, [1.0, 1.1, 0.9, 1.05] * 5)
    assert same.low <= 1.0 <= same.high


@pytest.mark.parametrize("a, b, match", [
    ([1.0, 2.0], [1.0], "same number"),
    ([1.0], [1.0], ">= 2"),
    (bench.Timing(1, 1, 1, 1, "no samples kept"), [1.0], "paired samples"),
    ([1.0, float("nan")], [1.0, 1.0], "finite"),
    ([1.0, 1.0], [1.0, 0.0], "positive"),
])
def test_ratio_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        bench.ratio(a, b)


def test_one_thread_pins_and_restores_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with bench.one_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2   # restored on the way out of an error too
    finally:
        torch.set_num_threads(before)
