"""The serving engine: requests in, one scheduler step and one model forward per iteration,
tokens streamed out as they are produced (Orca, Yu et al., OSDI 2022, §3–4).

    engine = Engine(model, SchedulerConfig(num_blocks=64, block_size=16, token_budget=64))
    engine.add_request(b"def ", SamplingParams(max_tokens=32), on_token=print)
    while engine.has_unfinished():
        engine.step()

Each step asks the scheduler (scheduler.py) which requests run and how many tokens each, runs
the tiny Llama once over that ragged batch on the paged KV pool (kv_pool.py), samples a token
for every request whose tokens are all in the cache (sampler.py), streams it (`on_token`), and
retires finished requests, whose full blocks stay in the prefix cache.

Time: `clock="steps"` counts iterations (arrivals and token times in steps: deterministic, what
the tests and traces use); `clock="wall"` reads time.perf_counter() since the engine started.
`replay` runs a whole arrival trace and yields every token as it comes. The static-batching
baseline of the lab's first claim is the same engine with SchedulerConfig(policy="static").
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from shared.models.llama import Llama
from shared.serving.kv_pool import KVPool
from shared.serving.request import Request, SamplingParams, Status, as_tokens
from shared.serving.sampler import sample
from shared.serving.scheduler import Scheduler, SchedulerConfig, Step


@dataclass(frozen=True)
class TokenEvent:
    request_id: object
    token: int
    step: int
    time: float
    finished: bool


class Engine:
    def __init__(self, model: Llama, config: SchedulerConfig | None = None, *,
                 clock: str = "steps", impl: str | None = None,
                 history_limit: int | None = None):
        if not isinstance(model, Llama):
            raise TypeError(f"model must be a shared.models.Llama, got {type(model).__name__}")
        if clock not in ("steps", "wall"):
            raise ValueError(f"clock must be 'steps' or 'wall', got {clock!r}")
        if history_limit is not None and (isinstance(history_limit, bool)
                                          or not isinstance(history_limit, int)
                                          or history_limit < 1):
            raise ValueError(f"history_limit must be None or an int >= 1, got {history_limit!r}")
        self.model, self.config = model, config or SchedulerConfig()
        self.scheduler = Scheduler(self.config)
        self.pool = KVPool(model, self.scheduler.manager)   # one allocator: the scheduler's
        self.impl, self.clock = impl, clock
        self.pending: list[Request] = []     # added, not yet arrived (arrival > now)
        self.requests: dict[object, Request] = {}
        self.history: list[Step] = []       # the last history_limit steps (None: all)
        self.history_limit = history_limit
        self._t0, self._steps, self._ids = time.perf_counter(), 0.0, itertools.count()
        self._generator = torch.Generator(model.lm_head.weight.device).manual_seed(0)

    @property
    def now(self) -> float:
        return self._steps if self.clock == "steps" else time.perf_counter() - self._t0

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, *, request_id=None,
                    arrival: float | None = None, on_token=None) -> Request:
        """Queue a request (prompt: bytes, str, token ids); it runs from `arrival` (default:
        now). Bad input raises ValueError naming the argument."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        cfg = self.model.config
        tokens = as_tokens(prompt, cfg.vocab_size)
        if len(tokens) >= cfg.max_seq_len:
            raise ValueError(f"prompt has {len(tokens)} tokens: the context is "
                             f"{cfg.max_seq_len}, and one must be left to generate")
        if len(tokens) + params.max_tokens > cfg.max_seq_len:
            raise ValueError(f"max_tokens={params.max_tokens} with a prompt of {len(tokens)} "
                             f"exceeds the context of {cfg.max_seq_len} tokens")
        need = -(-(len(tokens) + params.max_tokens) // self.config.block_size)
        if need > self.config.num_blocks:
            raise ValueError(f"prompt + max_tokens needs {need} blocks; the pool has "
                             f"{self.config.num_blocks} (num_blocks)")
        request_id = next(self._ids) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.model.lm_head.weight.device)
            generator.manual_seed(params.seed)
        r = Request(request_id, tokens, params, self.now if arrival is None else arrival,
                    on_token, generator=generator)
        self.requests[request_id] = r
        self.pending.append(r)
        return r

    def abort(self, request_id) -> None:
        """Stop a request (a client went away): its blocks go back at once."""
        if request_id not in self.requests:
            raise ValueError(f"request_id {request_id!r} is unknown")
        r = self.requests[request_id]
        if r in self.pending:
            self.pending.remove(r)
        if not r.finished:
            self.scheduler.finish(r)
            r.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return bool(self.pending or self.scheduler.waiting or self.scheduler.running)

    # ---- one iteration ----------------------------------------------------------------------
    def _arrive(self) -> None:
        now = self.now
        for r in sorted((r for r in self.pending if r.arrival <= now),
                        key=lambda r: r.arrival):
            self.pending.remove(r)
            self.scheduler.waiting.append(r)

    @torch.no_grad()
    def step(self) -> Step | None:
        """Schedule, run the model once, sample, stream. None when nothing could run."""
        self._arrive()
        if not (self.scheduler.waiting or self.scheduler.running):
            return None
        step = self.scheduler.schedule()
        if not step.items:                      # cannot happen: the oldest always fits
            raise RuntimeError(f"step {step.index} scheduled nothing with requests waiting")
        rows = [(id(r), r.tokens[r.num_computed:r.num_computed + n], r.num_computed)
                for r, n, _ in step.items]
        logits = self.pool.forward(self.model, rows)            # [B, V]
        self._steps += 1
        ready = []
        for i, (r, n, _) in enumerate(step.items):
            self.scheduler.computed(r, n)
            if r.remaining == 0:                # every token is in: the next one is due
                ready.append(i)
        chosen = sample(logits[ready], [step.items[i][0].params for i in ready],
                        [step.items[i][0].generator or self._generator for i in ready],
                        self.impl) if ready else []
        now = self.now
        for i, token in zip(ready, chosen, strict=True):
            r = step.items[i][0]
            r.append(token, now)
            if r.finished:
                self.scheduler.finish(r)
        self.history.append(step)
        if self.history_limit is not None and len(self.history) > 2 * self.history_limit:
            del self.history[:-self.history_limit]     # amortised: trim in halves
        return step

    def idle_until(self, t: float) -> None:
        """Nothing to run before t: the step clock jumps there, the wall clock sleeps."""
        if self.clock == "steps":
            self._steps = max(self._steps, t)
        else:
            time.sleep(max(0.0, t - self.now))

    def replay(self, trace) -> Iterator[TokenEvent]:
        """Run a trace of (prompt, SamplingParams, arrival) to the end, yielding each token
        as it is produced. The requests stay in `self.requests` (keyed by trace index)."""
        events: list[TokenEvent] = []
        for i, (prompt, params, arrival) in enumerate(trace):
            self.add_request(prompt, params, request_id=i, arrival=arrival,
                             on_token=lambda r, t: events.append(TokenEvent(
                                 r.request_id, t, self.scheduler.steps - 1, self.now,
                                 r.finished)))
        while self.has_unfinished():
            if self.step() is None:
                self.idle_until(min(r.arrival for r in self.pending))
            yield from events
            events.clear()

    def check(self) -> None:
        """Allocator and tree invariants; with nothing running, every block is free or cached."""
        self.scheduler.check()
        if not self.has_unfinished():
            m, cache = self.scheduler.manager, self.scheduler.cache
            cached = cache.num_blocks if cache is not None else 0
            assert m.num_free + cached == m.num_blocks, "blocks leaked"
            assert all(r.status is Status.FINISHED for r in self.requests.values())
