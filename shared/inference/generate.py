"""Autoregressive decoding with the KV cache: one target forward per new token.

The baseline speculative decoding is measured against, and the token-for-token reference its
greedy output must equal. Sampling goes through kernels/sampling (Gumbel-max); see `ops()` for
which implementation runs.

Everything runs on the model's device: the prompt is moved there, ids and caches are made
there, and a generator must be made there too (torch.Generator(device=...)). The loop never
reads a device value back, so on a GPU the host queues token after token without waiting;
the checks that would read values back run only under KC_DEBUG=1 (`debug_checks`).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from kernels.device import INTERPRET
from kernels.sampling import (
    gumbel_sample,
    gumbel_sample_reference,
    speculative_accept,
    speculative_accept_reference,
)
from kernels.sampling.checks import check_generator
from shared.inference.kv_cache import KVCache
from shared.models.llama import Llama


def ops(impl: str | None = None):
    """(sample, accept) functions: "triton" or "reference". By default Triton on a GPU and the
    torch reference under Triton's interpreter, whose ~1 ms of Python per program instance
    would otherwise be what decoding timings measure; tests prove both return the same tokens.
    """
    impl = impl or ("reference" if INTERPRET else "triton")
    if impl == "triton":
        return gumbel_sample, speculative_accept
    if impl == "reference":
        return gumbel_sample_reference, speculative_accept_reference
    raise ValueError(f"impl must be 'triton' or 'reference', got {impl!r}")


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution decoding samples from: softmax(logits / T), one-hot argmax at T = 0.
    (The one-hot is a scatter: F.one_hot reads its input's range back to the host on a CPU.)"""
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(logits.float() / temperature, dim=-1)


def next_token(logits: torch.Tensor, temperature: float, generator, sample) -> torch.Tensor:
    """logits [B, V] -> int64 [B]: the one place both decoding loops pick a token, so the
    autoregressive baseline and the speculative loop do the same work per token (greedy: a
    bare argmax, no argument checks, in both)."""
    if temperature == 0:
        return logits.argmax(-1)
    return sample(logits, temperature=temperature, generator=generator)


class Phases:
    """Wall-clock seconds and call counts per phase of a decoding loop (`profile=` of
    generate / speculative_generate), for measuring the paper's cost ratio c inside the real
    loops. On a GPU each phase ends with a synchronize: profile only in a separate pass."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.samples: dict[str, list[float]] = defaultdict(list)  # seconds per call, per block
        self._sync = False

    def bind(self, device: torch.device) -> Phases:
        self._sync = torch.device(device).type == "cuda"
        return self

    @contextmanager
    def __call__(self, name: str, calls: int = 1):
        if self._sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self._sync:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.seconds[name] += dt
        self.calls[name] += calls
        self.samples[name].append(dt / calls)

    def per_call(self, name: str) -> float:
        """Mean seconds per call."""
        if not self.calls[name]:
            raise ValueError(f"phase {name!r} never ran")
        return self.seconds[name] / self.calls[name]

    def median(self, name: str) -> float:
        """Median seconds per call over the timed blocks: on a shared CPU other jobs only
        add time, in bursts, and the median is not moved by a few slow blocks."""
        if not self.samples[name]:
            raise ValueError(f"phase {name!r} never ran")
        return statistics.median(self.samples[name])


def phase_timer(profile: Phases | None, device):
    """`profile` bound to the device, or a no-op timer when not profiling."""
    if profile is None:
        return lambda name, calls=1: nullcontext()
    if not isinstance(profile, Phases):
        raise TypeError(f"profile must be a Phases or None, got {type(profile).__name__}")
    return profile.bind(device)


def model_device(model: Llama) -> torch.device:
    return model.lm_head.weight.device


def check_prompt(model: Llama, prompt: torch.Tensor, n_new: int, extra: int = 0) -> None:
    """Shapes and sizes only (host metadata): free on any device."""
    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt must be a torch.Tensor, got {type(prompt).__name__}")
    if prompt.ndim != 2 or prompt.dtype != torch.long or prompt.shape[1] < 2:
        raise ValueError(f"prompt must be int64 [B, P] with P >= 2, got {prompt.dtype} "
                         f"{tuple(prompt.shape)}")
    if n_new <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {n_new}")
    need = prompt.shape[1] + n_new + extra
    if need > model.config.max_seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]}) + new tokens ({n_new}) + lookahead "
                         f"({extra}) exceed max_seq_len={model.config.max_seq_len}")


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, max_new_tokens] new tokens only
    target_calls: int  # target forwards, the prefill included
    draft_calls: int = 0


@torch.no_grad()
def generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             impl: str | None = None, profile: Phases | None = None) -> Generation:
    """prompt int64 [B, P] -> B continuations of max_new_tokens tokens, one forward each.
    `generator`, when given, must be on the model's device; `profile` (a Phases) collects
    the time of the prefill, of each one-token forward and of each token choice."""
    check_prompt(model, prompt, max_new_tokens)
    sample, _ = ops(impl)
    device = model_device(model)
    check_generator(generator, device)
    timer = phase_timer(profile, device)
    prompt = prompt.to(device)
    cache = KVCache(model.config, prompt.shape[0], max_len=prompt.shape[1] + max_new_tokens,
                    dtype=model.lm_head.weight.dtype, device=device)
    with timer("prefill"):
        logits = model(prompt, cache=cache)[:, -1]  # [B, V]
        cache.advance(prompt.shape[1])
    out = []
    for _ in range(max_new_tokens):
        with timer("choose"):
            out.append(next_token(logits, temperature, generator, sample))  # [B]
        if len(out) == max_new_tokens:
            break
        with timer("forward"):
            logits = model(out[-1][:, None], cache=cache)[:, -1]
            cache.advance(1)
    return Generation(torch.stack(out, 1), target_calls=max_new_tokens)
