"""Serving: requests, an iteration-level scheduler with chunked prefill and a radix prefix
cache, and the engine that runs the tiny Llama on a paged KV pool (issue 12).

The names below load on first use, so `kclub --help` and `kclub loadgen` (a client: it needs
no model) do not import torch and the kernels through this package.
"""

import importlib

_HOME = {"Engine": "engine", "TokenEvent": "engine", "RadixCache": "prefix_cache",
         "Request": "request", "SamplingParams": "request", "SchedulerConfig": "scheduler",
         "Step": "scheduler"}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"shared.serving.{_HOME[name]}"), name)
    raise AttributeError(f"module 'shared.serving' has no attribute {name!r}")
