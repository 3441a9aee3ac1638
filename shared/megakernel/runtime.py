"""Run a Llama decode step from its task graph: as one persistent launch, or one launch per
operator (the kernel-per-operator baseline, same task bodies), with launches counted.

    dec = MegakernelDecoder(model, batch=2, max_len=64)          # validates graph + schedule
    logits, next_tokens = dec.step(tokens)                       # one launch
    logits, next_tokens = dec.step(tokens, mode="per_operator")  # len(operators(graph)) launches

The KV cache is shared.inference.KVCache (its [L, B, Hkv, S, hd] layout is what the RoPE and
attention tasks address); each step appends one token per sequence and advances `lengths`.
"""

from __future__ import annotations

import torch

from kernels.device import INTERPRET, POISON
from kernels.megakernel import launch
from kernels.megakernel.persistent_triton import ARGS, OPS, gpu_blocks
from shared.inference.kv_cache import KVCache
from shared.megakernel.graph import build_decode_graph, operators
from shared.megakernel.schedule import (
    assign,
    pack,
    queue_tensors,
    weight_layout,
    workspace_layout,
)
from shared.megakernel.validate import validate
from shared.models.llama import Llama

MODES = ("persistent", "per_operator")
# A starved wait gives up after this many reads. In the interpreter nothing can arrive while a
# program spins, so a few reads prove the hang; on a GPU ~10^7 reads is seconds.
MAX_SPINS = 64 if INTERPRET else 10_000_000


class MegakernelDecoder:
    """Greedy decode steps of `model` for `batch` sequences (1..16), contexts up to max_len."""

    def __init__(self, model: Llama, batch: int, *, max_len: int | None = None,
                 workers: int = 1, tile: int = 128 if INTERPRET else 64):
        if not isinstance(model, Llama):
            raise TypeError(f"model must be a shared.models.Llama, got {type(model).__name__}")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 16:
            raise ValueError(f"batch must be an int in 1..16 (one tl.dot row block), got {batch!r}")
        if tile not in (16, 32, 64, 128):
            raise ValueError(f"tile must be one of 16, 32, 64, 128 (a BLOCK_N), got {tile!r}")
        c = model.config
        self.model, self.config, self.batch = model, c, batch
        self.cache = KVCache(c, batch, max_len=max_len, dtype=model.embed.weight.dtype,
                             device=model.embed.weight.device)
        self.graph = build_decode_graph(c, batch, tile=tile, seq_len=self.cache.max_len)
        self.order = validate(self.graph)
        self.queues = assign(self.graph, workers, self.order)
        dev = model.embed.weight.device
        weights, w_off = weight_layout(model)
        size, self.ws_offsets = workspace_layout(self.graph)
        table = pack(self.graph, w_off, self.cache.max_len)
        check_alignment(table)
        self.tables = {"TASKS": table.to(dev),
                       "EVENTS": torch.zeros(len(self.graph["events"]), dtype=torch.int32,
                                             device=dev),
                       "ERR": torch.zeros(1, dtype=torch.int32, device=dev)}
        self.queue, self.qstart = (t.to(dev) for t in queue_tensors(self.queues))
        self.per_op = [tuple(t.to(dev) for t in queue_tensors([[t] for t in group]))
                       for group in operators(self.graph)]
        blk = model.layers[0]
        self.state = {"WS": torch.zeros(size, dtype=torch.float32, device=dev), "W": weights,
                      "KC": self.cache.k, "VC": self.cache.v, "COS": blk.rope_cos,
                      "SIN": blk.rope_sin, "OUT": torch.zeros(batch, dtype=torch.int64,
                                                              device=dev),
                      "batch": batch, "head_dim": c.head_dim, "eps": c.norm_eps,
                      "sm_scale": c.head_dim ** -0.5}
        self.blocks = gpu_blocks(weights.dtype, c.head_dim, c.n_heads // c.n_kv_heads,
                                 tile)
        self.epoch = 0
        self.launches = 0   # kernel launches so far (counted calls)

    def step(self, tokens: torch.Tensor, *, mode: str = "persistent"
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per sequence ([batch] int64); return (logits [B, V] float32, the
        greedy next tokens [B]). Raises RuntimeError if a worker starved (a wait gave up)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or \
                tuple(tokens.shape) != (self.batch,):
            raise ValueError(f"tokens must be int64 [{self.batch}], got "
                             f"{getattr(tokens, 'dtype', type(tokens))} "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        if int(self.cache.lengths.max()) >= self.cache.max_len:
            raise ValueError(f"the cache is full ({self.cache.max_len} positions)")
        self.epoch += 1
        if POISON:   # every activation a task reads must have been written this step
            self.state["WS"].fill_(float("nan"))
            self.state["OUT"].fill_(-1)
        # the embed task reads TOK[b] at offset b: a strided view (prompt[:, -1]) must be copied
        state = self.state | {"TOK": tokens.contiguous(), "POS": self.cache.lengths}
        run = [(self.queue, self.qstart)] if mode == "persistent" else self.per_op
        for queue, qstart in run:
            launch(self.tables, state, queue=queue, qstart=qstart, epoch=self.epoch,
                   max_spins=MAX_SPINS, blocks=self.blocks)
            self.launches += 1
        err = int(self.tables["ERR"].item())
        if err:
            raise RuntimeError(f"task {err - 1} starved: a wait gave up after {MAX_SPINS} "
                               f"reads (with {len(self.queues)} workers under Triton's "
                               f"interpreter, a worker waited on a later program)")
        self.cache.lengths += 1
        off, (rows, cols) = self.ws_offsets["logits"], self.graph["buffers"]["logits"]
        logits = self.state["WS"][off:off + rows * cols].view(rows, cols).clone()
        return logits, self.state["OUT"].clone()


# Task-table columns the task bodies declare tl.multiple_of (tasks_triton): op -> {column:
# multiple}. 8 elements of a 16-bit weight or cache are one 16-byte cp.async; 4 float32
# activations are one. Without the hints each weight load was a 2-byte scalar load.
_ALIGNED = {OPS["matmul"]: {0: 4, 1: 4, 2: 8, 3: 8}, OPS["swiglu"]: {0: 4, 1: 4, 2: 8, 3: 8, 7: 8},
            OPS["attention"]: {2: 8}}


def check_alignment(table: torch.Tensor) -> None:
    """Raise ValueError if a task-table offset breaks an alignment the kernel assumes: with
    dim, ffn_dim and head_dim multiples of 8 every one holds (weight_layout, workspace_layout)."""
    for op, cols in _ALIGNED.items():
        rows = table[table[:, 0] == op]
        for col, multiple in cols.items():
            bad = rows[:, int(ARGS) + col] % multiple != 0
            if bool(bad.any()):
                raise ValueError(f"model dims: the {_OP_NAMES[op]} tasks need argument {col} a "
                                 f"multiple of {multiple} (got {int(rows[bad][0, int(ARGS) + col])}"
                                 f"): dim, ffn_dim and head_dim must be multiples of 8")


_OP_NAMES = {v: k for k, v in OPS.items()}


def eager_step(model: Llama, cache: KVCache, tokens: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same decode step in torch eager (the ecosystem's kernel-per-operator path)."""
    logits = model(tokens[:, None], cache=cache)[:, -1]
    cache.lengths += 1
    return logits, logits.argmax(-1)
