"""Continuous batching, chunked prefill and prefix caching: the measurements behind the lab, and
`kclub bench continuous-batching`.

Two clocks, kept apart. The engine runs on its *step* clock (`Engine(clock="steps")`): arrivals
and token times are in iterations, so a schedule — which request ran when, stalls, preemptions,
cache hits, TTFT in steps — is exact and repeatable. Each step's cost on this CPU is measured
around `Engine.step` as the process's CPU time (`time.process_time`, all its threads), which
other jobs sharing the cores do not inflate as they do wall time, and attached to the schedule
afterwards (`Run.cpu`): latencies in seconds are the schedule's steps at their measured cost.
Those steps also fit the step-time model; `shared.serving.simulate` prices the same schedules on
an H100 from counted work.

The model is the shipped one-block draft in float64: batched and solo runs agree to ~1e-16, so
"the same tokens as alone" can be asserted exactly.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from shared import bench
from shared.benchmarks import record
from shared.models import zoo
from shared.serving import Engine, SamplingParams, SchedulerConfig
from shared.serving.loadgen import arrivals, make_trace
from shared.serving.scheduler import Step


@functools.cache
def model():
    return zoo.load("draft", train_if_missing=False).double()


def trace(n: int, rate: float, *, burstiness: float = 1.0, prompt_len=(16, 96),
          max_tokens=(8, 48), seed: int = 0, system: int = 0):
    """(prompt bytes, SamplingParams, arrival in steps): `kclub loadgen`'s seeded trace (stdlib
    source windows, gamma gaps at `rate` requests per step). `system` > 0 prefixes every
    prompt with the same `system` bytes: the shared-system-prompt workload."""
    reqs = make_trace(n, rate, burstiness=burstiness, prompt_len=prompt_len,
                      max_tokens=max_tokens, seed=seed)
    head = make_trace(1, 1.0, prompt_len=(system, system), seed=seed + 7)[0].prompt.encode() \
        if system else b""
    return [(head + r.prompt.encode(), SamplingParams(max_tokens=r.max_tokens), r.arrival)
            for r in reqs]


@dataclass
class Run:
    engine: Engine
    clock: np.ndarray       # the step clock after each executed step
    cpu: np.ndarray         # each executed step's measured CPU seconds (time.process_time)

    @property
    def steps(self) -> list[Step]:
        return self.engine.history

    def _w(self, c: float) -> float:
        """Measured seconds of the steps done by step-clock time c (idle jumps cost 0)."""
        return float(self.cpu[:np.searchsorted(self.clock, c, side="right")].sum())

    def latencies(self) -> dict:
        """TTFT and time-between-tokens per request, in steps and in measured seconds."""
        out = {"ttft_steps": [], "tbt_steps": [], "ttft_s": [], "tbt_s": []}
        for r in self.engine.requests.values():
            times = r.token_times
            out["ttft_steps"].append(times[0] - r.arrival)
            out["ttft_s"].append(self._w(times[0]) - self._w(r.arrival))
            out["tbt_steps"] += list(np.diff(times))
            w = [self._w(t) for t in times]
            out["tbt_s"] += list(np.diff(w))
        return {k: np.asarray(v, dtype=float) for k, v in out.items()}

    def summary(self) -> dict:
        lat = self.latencies()
        tokens = sum(len(r.output) for r in self.engine.requests.values())
        pct = lambda x, q: float(np.percentile(x, q)) if len(x) else 0.0   # noqa: E731
        return {"steps": len(self.steps), "tokens": tokens, "cpu_s": float(self.cpu.sum()),
                "tokens_per_step": tokens / len(self.steps),
                "tokens_per_s": tokens / float(self.cpu.sum()),
                "ttft_steps_p50": pct(lat["ttft_steps"], 50),
                "ttft_steps_p99": pct(lat["ttft_steps"], 99),
                "ttft_ms_p50": 1e3 * pct(lat["ttft_s"], 50),
                "ttft_ms_p99": 1e3 * pct(lat["ttft_s"], 99),
                "tbt_ms_p50": 1e3 * pct(lat["tbt_s"], 50),
                "tbt_ms_p99": 1e3 * pct(lat["tbt_s"], 99),
                "decode_stalls": sum(s.decode_stalls for s in self.steps),
                "preemptions": sum(len(s.preempted) for s in self.steps),
                "cached_tokens": sum(s.cached_tokens for s in self.steps),
                "prefill_tokens": sum(s.prefill_tokens for s in self.steps)}


def _drive(engine: Engine) -> Run:
    clock, cpu = [], []
    while engine.has_unfinished():
        t0 = time.process_time()
        step = engine.step()
        if step is None:                        # nothing arrived yet: jump, costs no time
            engine.idle_until(min(r.arrival for r in engine.pending))
            continue
        cpu.append(time.process_time() - t0)
        clock.append(engine.now)
    engine.check()                              # no block leaked, every request finished
    return Run(engine, np.asarray(clock), np.asarray(cpu))


def replay(requests, config: SchedulerConfig) -> Run:
    """Run a trace to the end on a fresh engine, timing every step."""
    engine = Engine(model(), config)
    for i, (prompt, params, arrival) in enumerate(requests):
        engine.add_request(prompt, params, request_id=i, arrival=arrival)
    return _drive(engine)


def compare(requests, configs: dict[str, SchedulerConfig], repeat: int):
    """Wall time of the whole trace under each config, interleaved round by round
    (`bench.compare`, no warm-up: every round is a fresh engine on the same trace) -> (timings,
    the last run of each config: the schedule is the same every round, only its time varies)."""
    last = {}

    def one(name):
        last[name] = replay(requests, configs[name])

    timings = bench.compare({name: functools.partial(one, name) for name in configs}, warmup=0,
                            repeat=repeat)
    return timings, last


def chat(config: SchedulerConfig, conversations: int, turns: int, *, user_len=(16, 32),
         max_tokens: int = 24, seed: int = 0) -> Run:
    """Multi-turn chat, closed loop: each conversation's next turn arrives when its previous
    answer is done, its prompt the whole history (earlier prompts and answers) plus a new
    user message — the workload where a prefix cache reuses the previous turn's blocks."""
    users = make_trace(conversations * turns, 1.0, prompt_len=user_len, seed=seed)
    engine = Engine(model(), config)

    def ask(conv: int, turn: int, history: bytes, arrival: float) -> None:
        prompt = history + b"\n# user: " + users[conv * turns + turn].prompt.encode() + b"\n"

        def done(r, _token):
            if r.finished and turn + 1 < turns:
                ask(conv, turn + 1, bytes(r.tokens), engine.now)

        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens),
                           request_id=(conv, turn), arrival=arrival, on_token=done)

    for c in range(conversations):
        ask(c, 0, b"", float(c))
    return _drive(engine)


def features(steps: list[Step]) -> np.ndarray:
    """[1, prefill tokens, decode tokens, K/V tokens read] per step: the step-time model's
    regressors (a per-step cost, linear work per token, attention work per cached token)."""
    return np.array([[1.0, s.prefill_tokens, s.decode_tokens, s.kv_tokens] for s in steps])


@dataclass(frozen=True)
class StepModel:
    coef: np.ndarray        # seconds: per step, per prefill token, per decode token, per KV token

    def __call__(self, step: Step) -> float:
        return float((features([step]) @ self.coef)[0])

    def r2(self, steps: list[Step], seconds) -> float:
        y = np.asarray(seconds)
        resid = y - features(steps) @ self.coef
        return float(1 - (resid ** 2).sum() / ((y - y.mean()) ** 2).sum())


def fit_step_time(steps: list[Step], seconds) -> StepModel:
    """Least squares of measured step seconds on `features`."""
    coef, *_ = np.linalg.lstsq(features(steps), np.asarray(seconds, dtype=float), rcond=None)
    return StepModel(coef)


def timeline(steps: list[Step], ids) -> np.ndarray:
    """[request, step]: 0 idle, 1 prefill chunk, 2 decode, 3 preempted at this step."""
    row = {rid: i for i, rid in enumerate(ids)}
    grid = np.zeros((len(row), len(steps)), dtype=int)
    for j, s in enumerate(steps):
        for r, _, kind in s.items:
            grid[row[r.request_id], j] = 1 if kind == "prefill" else 2
        for rid in s.preempted:
            grid[row[rid], j] = 3
    return grid


def hit_ceiling(requests, block_size: int) -> float:
    """The most prompt tokens a block cache could serve: for each request (in arrival order),
    its longest common prefix with the tokens (prompt and output) of any earlier request, in
    full blocks and leaving one prompt token to run for its logits; over all prompt tokens.
    Reached only if every earlier request's blocks are computed and kept when it arrives."""
    def common(a, b) -> int:
        n = min(len(a), len(b))
        return next((i for i in range(n) if a[i] != b[i]), n)

    seen, hits = [], 0
    for r in sorted(requests, key=lambda r: r.arrival):
        p = r.prompt
        best = max((common(p, t) for t in seen), default=0)
        hits += min(best, len(p) - 1) // block_size * block_size
        seen.append(r.tokens)
    return hits / sum(len(r.prompt) for r in requests)


def sim_trace(n: int, rate: float, *, seed: int = 0, prompt_len=(128, 1024),
              max_tokens=(64, 512), system: int = 0):
    """A trace for `simulate` at a real model's scale, arrivals in seconds: token ids are only
    needed for the prefix cache, so prompts are ids drawn at random after a shared system
    prompt of `system` tokens."""
    rng = np.random.default_rng(seed)
    head = rng.integers(0, 256, system).tolist()
    return [(head + rng.integers(0, 256, int(rng.integers(*prompt_len))).tolist(),
             int(rng.integers(*max_tokens)), float(t))
            for t in arrivals(n, rate, seed=seed)]


def sim_summary(sim) -> dict:
    """Throughput and latency of a simulated run (seconds of the step-time model)."""
    ttft = [r.token_times[0] - r.arrival for r in sim.requests]
    tbt = [g for r in sim.requests for g in np.diff(r.token_times)]
    tokens = sum(len(r.output) for r in sim.requests)
    return {"tokens_per_s": tokens / sim.end, "requests_per_s": len(sim.requests) / sim.end,
            "ttft_s_p50": float(np.median(ttft)), "tbt_s_p99": float(np.percentile(tbt, 99)),
            "steps": len(sim.steps)}


def main() -> int:
    import torch

    from shared import device

    torch.set_num_threads(1)    # ~1 ms steps of small ops: a second thread only spin-waits
    n = device.pick(ci=24, full=200)
    base = dict(num_blocks=64, block_size=16, max_num_seqs=8)
    reqs = trace(n, 0.25, seed=0)
    for policy in ("sarathi", "prefill_first", "static"):
        s = replay(reqs, SchedulerConfig(token_budget=64, policy=policy, **base)).summary()
        record("continuous-batching", {"policy": policy, **s})   # step counts + CPU times
    return 0
