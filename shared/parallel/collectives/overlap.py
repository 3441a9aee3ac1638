"""DDP-style gradient bucketing: all-reduce each bucket while the backward pass goes on
(Li et al., PyTorch Distributed, VLDB 2020, §3.2.3), against all-reducing after it.

Gradients become ready last layer first. Buckets are filled in that order (`bucket_plan`); the
moment a bucket's last gradient is ready it goes to a communication thread, which all-reduces
buckets one at a time in order (every rank must issue them in the same order) while the main
thread computes the next layers' gradients. Without overlap the same buckets are reduced after
the whole backward: step time C + A instead of about max(C, A) + the last bucket's A.

Emulated compute (as in the pipeline lab): each layer's backward does its real gradient
arithmetic, then sleeps until it has lasted `slot_s`, so two cores shared by two ranks and their
communication threads show the schedule rather than CPU contention. On a GPU the compute would
be a CUDA stream and the sleep would go.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from shared.parallel.collectives.ring import ring_all_reduce
from shared.parallel.pipeline.stages import sleep_until


def bucket_plan(numels: list[int], bucket_elems: int) -> list[list[int]]:
    """Layer indices per bucket, last layer first; a bucket closes once it holds at least
    `bucket_elems` elements (DDP's bucket_cap_mb, in elements)."""
    if bucket_elems < 1:
        raise ValueError(f"bucket_elems must be >= 1, got {bucket_elems}")
    buckets, cur, size = [], [], 0
    for i in reversed(range(len(numels))):
        cur.append(i)
        size += numels[i]
        if size >= bucket_elems:
            buckets.append(cur)
            cur, size = [], 0
    if cur:
        buckets.append(cur)
    return buckets


def _reduce_bucket(grads: list[torch.Tensor], bucket: list[int], world: int) -> None:
    flat = torch.cat([grads[i].reshape(-1) for i in bucket])
    ring_all_reduce(flat)
    flat /= world  # DDP averages
    off = 0
    for i in bucket:
        n = grads[i].numel()
        grads[i].copy_(flat[off:off + n].view_as(grads[i]))
        off += n


def backward_step(acts: list[torch.Tensor], douts: list[torch.Tensor], buckets: list[list[int]],
                  slot_s: float, world: int, *, overlap: bool):
    """One emulated backward of a stack of linear layers (layer i's weight gradient is
    acts[i].T @ douts[i]) with its gradient all-reduce. Returns (grads, spans): spans are
    (kind, index, start, end) with kind "compute" (a layer), "comm" (a bucket's all-reduce) or
    "ready" (the instant a bucket was handed to the all-reduce: the order the schedule sets,
    whereas when the communication thread wakes depends on the OS), times from this call's
    start."""
    t0 = time.perf_counter()
    grads: list[torch.Tensor | None] = [None] * len(acts)
    spans: list[tuple[str, int, float, float]] = []
    todo: queue.Queue = queue.Queue()
    errors: list[BaseException] = []

    def comm():
        while (b := todo.get()) is not None:
            s = time.perf_counter()
            try:
                _reduce_bucket(grads, buckets[b], world)
            except BaseException as e:  # re-raised on the main thread
                errors.append(e)
                return
            spans.append(("comm", b, s - t0, time.perf_counter() - t0))

    thread = threading.Thread(target=comm, daemon=True)
    if overlap:
        thread.start()
    owner = {i: b for b, layers in enumerate(buckets) for i in layers}
    left = [len(layers) for layers in buckets]
    for k, i in enumerate(reversed(range(len(acts)))):
        s = time.perf_counter()
        grads[i] = acts[i].T @ douts[i]  # the real arithmetic of this layer's backward
        sleep_until(t0 + (k + 1) * slot_s)  # ...held to its slot (emulated compute)
        spans.append(("compute", i, s - t0, time.perf_counter() - t0))
        left[owner[i]] -= 1
        if left[owner[i]] == 0 and overlap:
            now = time.perf_counter() - t0
            spans.append(("ready", owner[i], now, now))
            todo.put(owner[i])
    if overlap:
        todo.put(None)
        thread.join()
        if errors:
            raise errors[0]
    else:  # after the whole backward, the same buckets in the same order
        for b in range(len(buckets)):
            s = time.perf_counter()
            spans.append(("ready", b, s - t0, s - t0))
            _reduce_bucket(grads, buckets[b], world)
            spans.append(("comm", b, s - t0, time.perf_counter() - t0))
    return grads, spans


def predict(slot_s: float, buckets: list[list[int]], comm_s: list[float]) -> dict[str, float]:
    """Step time without and with overlap, from the slot and each bucket's measured all-reduce
    time: without, C + sum(A_b); with, buckets go one after another on the communication
    thread, each from max(ready, previous end), and the step ends with the later of the last
    layer and the last bucket."""
    layers = sum(len(b) for b in buckets)
    compute = layers * slot_s
    end, done = 0.0, 0
    for layers_b, a in zip(buckets, comm_s, strict=True):
        done += len(layers_b)
        end = max(end, done * slot_s) + a
    return {"no overlap": compute + sum(comm_s), "overlap": max(compute, end)}
