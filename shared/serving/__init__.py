"""Serving: requests, an iteration-level scheduler with chunked prefill and a radix prefix
cache, and the engine that runs the tiny Llama on a paged KV pool (issue 12)."""

from shared.serving.engine import Engine, TokenEvent
from shared.serving.prefix_cache import RadixCache
from shared.serving.request import Request, SamplingParams
from shared.serving.scheduler import SchedulerConfig, Step

__all__ = ["Engine", "RadixCache", "Request", "SamplingParams", "SchedulerConfig", "Step",
           "TokenEvent"]
