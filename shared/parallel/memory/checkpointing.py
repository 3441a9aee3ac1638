"""Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").

A chain of n layers normally keeps every layer's internal activations for the backward:
memory O(n). Cut the chain into segments, keep only each segment's input, and recompute a
segment's internals when the backward reaches it (§3, Algorithm 1 with the simple rule of
§4.1): with segments of k layers the peak is (n / k) boundaries + one segment's internals
k, minimised at k = √n: O(√n) memory for one extra forward pass.

`run(blocks, x, schedule)` applies the blocks under a schedule: "none" (keep everything),
"per-layer" (k = 1: every block's input kept, one block recomputed at a time) or "sqrt"
(k = ceil(√n)). `Segment` is the checkpoint itself: forward without building a graph, then in
the backward, forward again with one, and backward through that.
`SavedBytes` measures what autograd holds for the backward: bytes of distinct storages saved
by the graph (parameters excluded), live now and at their peak over forward and backward.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("none", "per-layer", "sqrt")


def segment_size(n: int, schedule: str) -> int:
    """Layers per segment: n for "none", 1 for "per-layer", ceil(√n) for "sqrt"."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 layers, got {n}")
    return {"none": n, "per-layer": 1, "sqrt": math.ceil(math.sqrt(n))}[schedule]


class Segment(torch.autograd.Function):
    """y = blocks(x) with only x kept: the backward recomputes blocks(x) with a graph and
    runs the backward through it (parameters' gradients accumulate there)."""

    @staticmethod
    def forward(ctx, x, blocks, *params):
        ctx.blocks = blocks
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _apply(blocks, x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            y = _apply(ctx.blocks, x)          # the extra forward
        torch.autograd.backward(y, grad)
        return (x.grad, None) + (None,) * len(ctx.needs_input_grad[2:])


def _apply(blocks, x):
    for b in blocks:
        x = b(x)
    return x


def run(blocks: nn.ModuleList | list[nn.Module], x: torch.Tensor, schedule: str) -> torch.Tensor:
    """Apply `blocks` to x in order under `schedule` (see the module docstring)."""
    k = segment_size(len(blocks), schedule)
    if schedule == "none" or not torch.is_grad_enabled():
        return _apply(blocks, x)
    for i in range(0, len(blocks), k):
        seg = list(blocks[i:i + k])
        # the parameters go in as inputs only so autograd knows the segment depends on them
        params = [p for b in seg for p in b.parameters() if p.requires_grad]
        x = Segment.apply(x, seg, *params)
    return x


class SavedBytes:
    """Context manager: counts the bytes autograd saves for the backward inside it (each
    distinct storage once; parameters are model state, not activations, and are excluded).
    `peak` is the most held at once, over the forward and the backward (recomputation too:
    a checkpointed segment's backward saves its internals again, here)."""

    def __init__(self, exclude: list[torch.Tensor] = ()):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.skip or key == 0:
            return t
        if self._refs.get(key, 0) == 0:
            self.live += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] = self._refs.get(key, 0) + 1
        return _Held(t, self, key, t.untyped_storage().nbytes())

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= nbytes

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    """A saved tensor; when autograd drops it (graph freed), its bytes stop counting."""

    def __init__(self, t, counter: SavedBytes, key: int, nbytes: int):
        self.t = t
        weakref.finalize(self, counter._release, key, nbytes)


def llama_step(model, tokens: torch.Tensor, schedule: str, *, count: bool = True
               ) -> tuple[torch.Tensor, SavedBytes | None]:
    """One forward and backward of a shared.models.llama.Llama on next-token targets (tokens
    predict themselves shifted by one), its blocks run under `schedule`; gradients accumulate
    in the parameters. Returns the loss and, with `count`, the step's saved-bytes counter
    (its hooks cost time: timings run with count=False)."""
    saved = SavedBytes(list(model.parameters())) if count else None
    with saved if saved is not None else contextlib.nullcontext():
        h = run(model.layers, model.embed(tokens[:, :-1]), schedule)
        logits = model.lm_head(model.norm(h))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
    return loss.detach(), saved
