"""The scheduler without the model: the same schedules the engine makes, each step priced by a
step-time model instead of run, so a trace can be replayed "on an H100" from this CPU.

`simulate` drives the real `Scheduler` exactly as `Engine.step` does — arrivals, schedule,
`computed`, one token for every request whose tokens are all in, finish — but the token is a
placeholder and the clock advances by `step_time(step)` seconds. With greedy requests and no
stop conditions the schedule does not depend on which tokens come out, so it is the engine's
schedule step for step (tests/test_continuous_batching.py checks it) — except that with the
prefix cache on, a later prompt that continues an earlier request's *answer* hits blocks the
placeholders do not match. Arrivals are in the same unit as step_time's result.

`roofline_step_time(shape, hw)` prices a step from counted work (the `shared.roofline` bound
of its FLOPs and bytes): every weight read once per step, each row's K, V read once per layer,
new K, V written, the LM head on one position per row. A floor, not a forecast: kernel launch
and host overheads, which real engines pay per step, are not in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shared import roofline
from shared.serving.request import Request, SamplingParams
from shared.serving.scheduler import Scheduler, SchedulerConfig, Step


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    bytes_per_param: int = 2          # bf16 weights and KV cache

    @property
    def layer_params(self) -> int:
        q_o = 2 * self.dim * self.n_heads * self.head_dim
        kv = 2 * self.dim * self.n_kv_heads * self.head_dim
        return self.n_layers * (q_o + kv + 3 * self.dim * self.ffn_dim)   # SwiGLU: 3 matrices

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.bytes_per_param


# Llama-3-8B (Meta's model card): 32 layers, d 4096, 32 query / 8 KV heads, FFN 14336.
LLAMA3_8B = ModelShape("Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256)


def step_work(shape: ModelShape, step: Step) -> tuple[float, float]:
    """(FLOPs, bytes) of one step of `shape` over this step's rows."""
    tokens = step.prefill_tokens + step.decode_tokens
    rows = len(step.items)
    flops = (2 * shape.layer_params * tokens + 2 * shape.dim * shape.vocab_size * rows
             + 4 * shape.n_layers * shape.n_heads * shape.head_dim * step.attention_pairs)
    weights = (shape.layer_params + shape.dim * shape.vocab_size) * shape.bytes_per_param
    kv = shape.kv_bytes_per_token * (step.kv_tokens + tokens)    # read the context, write new
    return float(flops), float(weights + kv)


def roofline_step_time(shape: ModelShape = LLAMA3_8B, hw: str = "H100 SXM",
                       dtype: str = "bf16") -> Callable[[Step], float]:
    def price(step: Step) -> float:
        return roofline.predict(*step_work(shape, step), hw, dtype).time_s
    return price


@dataclass
class SimResult:
    requests: list[Request]
    steps: list[Step]
    step_s: list[float]               # each step's price
    end: float                        # the clock when the last request finished


def simulate(trace, config: SchedulerConfig, step_time: Callable[[Step], float],
             max_steps: int = 1_000_000) -> SimResult:
    """trace: (prompt token ids, max_tokens, arrival). Every request is greedy with no stop,
    so its tokens are placeholders (0) and only the lengths and prompts matter."""
    sched = Scheduler(config)
    pending = sorted((Request(i, tuple(p), SamplingParams(max_tokens=m), float(a))
                      for i, (p, m, a) in enumerate(trace)), key=lambda r: r.arrival)
    requests, steps, prices = sorted(pending, key=lambda r: r.request_id), [], []
    now = 0.0
    while pending or sched.waiting or sched.running:
        while pending and pending[0].arrival <= now:
            sched.waiting.append(pending.pop(0))
        if not (sched.waiting or sched.running):
            now = pending[0].arrival                  # idle until the next arrival
            continue
        if len(steps) >= max_steps:
            raise RuntimeError(f"no end after max_steps={max_steps} steps")
        step = sched.schedule()
        prices.append(step_time(step))
        now += prices[-1]
        for r, n, _ in step.items:
            sched.computed(r, n)
        for r, _, _ in step.items:
            if r.remaining == 0:                      # every token in: the next one is due
                r.append(0, now)
                if r.finished:
                    sched.finish(r)
        steps.append(step)
    return SimResult(requests, steps, prices, now)
