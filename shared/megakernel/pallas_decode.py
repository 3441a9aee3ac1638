"""Greedy decode steps of the tiny Llama by the Pallas persistent kernel, on several TPU cores
(simulated on a CPU by TPU interpret mode, where the workers are threads that really block).

    dec = PallasDecoder(model, batch=2, cores=4,
                        interpret=pltpu.InterpretParams(detect_races=True))
    logits, next_tokens = dec.step(tokens)     # one launch: the whole step's task graph

The graph is graph.build_decode_graph (the Triton kernel's), validated, dealt round-robin to the
cores (schedule.assign), then turned into the kernel's int32 tables here. The KV cache lives in
JAX arrays [L, B, Hkv, S, hd]; each step writes one position per sequence in place.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from kernels.device import pallas_interpret
from kernels.megakernel.persistent_pallas import OPS, decode_step_pallas
from shared.megakernel.graph import build_decode_graph
from shared.megakernel.schedule import assign
from shared.megakernel.validate import GraphError, validate
from shared.models.llama import Llama


def _code_and_args(task: dict, n_layers: int) -> tuple[int, list[int]]:
    """The kernel's op code and ARG row (layer or norm index, column, b, kv head) of a task."""
    op, a, layer = task["op"], task["args"], task["layer"]
    if op == "rmsnorm":
        w = a["weight"]
        index = 2 * n_layers if w == "norm" else 2 * layer + (w.endswith("ffn_norm"))
        return OPS["rmsnorm"], [index, 0, 0, 0]
    if op == "matmul":
        kind = a["weights"][0].split(".")[-1]          # qkv, o_proj, down_proj or lm_head
        return OPS[kind], [0 if kind == "lm_head" else layer, a["col"], 0, 0]
    if op == "swiglu":
        return OPS["swiglu"], [layer, a["col"], 0, 0]
    if op in ("rope", "attention"):
        return OPS[op], [layer, 0, a["b"], a["kv_head"]]
    if op == "add":
        return OPS[f"add_{a['b']}"], [layer, a["col"], 0, 0]
    if op in ("embed", "argmax"):
        return OPS[op], [0, 0, 0, 0]
    raise GraphError(f"task {task['id']}: op {op!r} has no Pallas body")


def pallas_tables(graph: dict, queues: list[list[int]]) -> dict[str, np.ndarray]:
    """The worker loop's int32 tables but TOK and POS (kernels/megakernel/persistent_pallas.py).

    TPU semaphores are per core and indistinct: a waiter takes any `need` signals on its core's
    counter. So each producer signals an event once per core that has consumers of it, and only
    the first consumer in each core's queue waits (for `need` signals: every producer has then
    finished); the later ones on that core run after it in program order. Were every consumer
    signalled and waiting, one could take a sibling's signals from the same producer and start
    before the others had finished (the race detector caught that)."""
    tasks = graph["tasks"]
    cores_of: dict[int, list[int]] = {}       # event -> the cores its consumers are queued on
    waits = {}                                # task -> the event it must wait on, or -1
    for c, queue in enumerate(queues):
        for t in queue:
            task_waits = tasks[t]["waits"]
            if len(task_waits) > 1:
                raise GraphError(f"task {t} ({tasks[t]['op']}) waits on {len(task_waits)} "
                                 f"events: the Pallas loop takes at most one")
            first = bool(task_waits) and c not in cores_of.get(task_waits[0], [])
            if first:
                cores_of.setdefault(task_waits[0], []).append(c)
            waits[t] = task_waits[0] if first else -1
    sig_start, sig_event, sig_core = [0], [], []
    for t in tasks:
        for e in t["triggers"]:
            for c in cores_of.get(e, []):
                sig_event.append(e)
                sig_core.append(c)
        sig_start.append(len(sig_event))
    queue = np.zeros((len(queues), max(map(len, queues))), np.int32)
    for c, q in enumerate(queues):
        queue[c, :len(q)] = q
    codes = [_code_and_args(t, graph["model"]["n_layers"]) for t in tasks]
    i32 = functools.partial(np.asarray, dtype=np.int32)
    return {"OP": i32([c for c, _ in codes]), "ARG": i32([a for _, a in codes]),
            "WAIT": i32([waits[t["id"]] for t in tasks]),
            "NEED": i32([graph["events"][waits[t["id"]]]["need"] if waits[t["id"]] >= 0 else 0
                         for t in tasks]),
            "QUEUE": queue, "QLEN": i32([len(q) for q in queues]),
            "SIG_START": i32(sig_start), "SIG_EVENT": i32(sig_event or [0]),
            "SIG_CORE": i32(sig_core or [0])}


def pallas_weights(model: Llama, tile: int) -> dict[str, jnp.ndarray]:
    """The model's weights stacked per kind and stored input-major ([L, K, N]); the lm-head's
    vocabulary zero-padded to whole tiles; RoPE's cos and sign-folded sin per position."""
    c, hd = model.config, model.config.head_dim

    def j(t: torch.Tensor) -> jnp.ndarray:
        return jnp.asarray(t.detach().cpu().numpy())

    def stack(get) -> jnp.ndarray:
        return j(torch.stack([get(blk).weight.T for blk in model.layers]))

    norms = [n.weight for blk in model.layers for n in (blk.attn_norm, blk.ffn_norm)]
    head = model.lm_head.weight.T                                     # [D, V]
    head = torch.nn.functional.pad(head, (0, -c.vocab_size % tile))
    sign = torch.where(torch.arange(hd) < hd // 2, -1.0, 1.0)
    blk = model.layers[0]
    qkv = [torch.cat([b.attn.q_proj.weight, b.attn.k_proj.weight, b.attn.v_proj.weight]).T
           for b in model.layers]
    return {"embed": j(model.embed.weight),
            "norms": j(torch.stack([*norms, model.norm.weight])[:, None, :]),
            "wqkv": j(torch.stack(qkv)), "wo": stack(lambda b: b.attn.o_proj),
            "w_gate": stack(lambda b: b.ffn.gate_proj), "w_up": stack(lambda b: b.ffn.up_proj),
            "w_down": stack(lambda b: b.ffn.down_proj), "lm_head": j(head[None]),
            "cos": j(blk.rope_cos.float()), "sin_signed": j(blk.rope_sin.float() * sign)}


@functools.partial(jax.jit, static_argnames=("dims", "cores", "n_events", "eps", "interpret"))
def _step(tables, weights, k_cache, v_cache, *, dims, cores, n_events, eps, interpret):
    k_ref, v_ref = jax.new_ref(k_cache), jax.new_ref(v_cache)   # aliased in and out
    acts, next_tokens = decode_step_pallas(tables, weights, k_ref, v_ref, dims=dict(dims),
                                           cores=cores, n_events=n_events, eps=eps,
                                           interpret=interpret)
    return acts, next_tokens, k_ref[...], v_ref[...]


class PallasDecoder:
    """Greedy decode steps of `model` (float32 weights) for `batch` sequences by `cores`
    persistent workers; contexts up to max_len (default the model's max_seq_len)."""

    def __init__(self, model: Llama, batch: int, *, max_len: int | None = None, cores: int = 4,
                 tile: int = 128, interpret=None):
        if not isinstance(model, Llama):
            raise TypeError(f"model must be a shared.models.Llama, got {type(model).__name__}")
        if model.embed.weight.dtype != torch.float32:
            raise TypeError(f"model weights must be float32, got {model.embed.weight.dtype}")
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ValueError(f"cores must be a positive int, got {cores!r}")
        c = model.config
        max_len = c.max_seq_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or \
                not 1 <= max_len <= c.max_seq_len:
            raise ValueError(f"max_len must be an int in 1..{c.max_seq_len}, got {max_len!r}")
        n_qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1 or \
                any(n % tile for n in (c.dim, c.ffn_dim, n_qkv)):
            raise ValueError(f"tile={tile!r} must divide dim={c.dim}, ffn_dim={c.ffn_dim} and "
                             f"the qkv width {n_qkv} (whole DMA tiles)")
        self.graph = build_decode_graph(c, batch, tile=tile, seq_len=max_len)  # checks batch
        self.queues = assign(self.graph, cores, validate(self.graph))
        self.tables = {k: jnp.asarray(v) for k, v in pallas_tables(self.graph, self.queues).items()}
        self.weights = pallas_weights(model, tile)
        shape = (c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim)
        self.k_cache, self.v_cache = jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
        self.lengths = np.zeros(batch, np.int32)
        self.batch, self.max_len, self.config = batch, max_len, c
        self.dims = (("B", batch), ("D", c.dim), ("F", c.ffn_dim), ("V", c.vocab_size),
                     ("Vp", self.weights["lm_head"].shape[-1]), ("H", c.n_heads),
                     ("Hkv", c.n_kv_heads), ("head_dim", c.head_dim),
                     ("group", c.n_heads // c.n_kv_heads), ("tile", tile), ("S", max_len),
                     ("sm_scale", c.head_dim ** -0.5))
        if interpret is not None and not isinstance(interpret, bool):
            interpret = dataclasses.replace(interpret, num_cores_or_threads=cores)
        threads = int(os.environ.get("NPROC", os.cpu_count() or 1))
        if (interpret or (interpret is None and pallas_interpret())) and cores + 2 > threads:
            raise ValueError(f"cores={cores} interpret threads need cores + 2 of XLA:CPU's "
                             f"{threads} worker threads (NPROC; kernels/device.py), or the "
                             f"waiting cores deadlock")
        self.cores, self.eps, self.interpret = cores, c.norm_eps, interpret
        self.acts: dict = {}

    def step(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token per sequence ([batch] ints); return (logits [B, V] float32, the greedy
        next tokens [B] int64). The step's activations stay in `self.acts`."""
        tokens = np.asarray(tokens)
        if tokens.shape != (self.batch,) or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be {self.batch} integers, got {tokens.dtype} "
                             f"{tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"tokens must lie in [0, {self.config.vocab_size})")
        if self.lengths.max() >= self.max_len:
            raise ValueError(f"the cache is full ({self.max_len} positions)")
        tables = self.tables | {"TOK": jnp.asarray(tokens, jnp.int32),
                                "POS": jnp.asarray(self.lengths)}
        self.acts, nxt, self.k_cache, self.v_cache = _step(
            tables, self.weights, self.k_cache, self.v_cache, dims=self.dims, cores=self.cores,
            n_events=len(self.graph["events"]), eps=self.eps, interpret=self.interpret)
        self.lengths += 1
        logits = np.asarray(self.acts["logits"])[:, :self.config.vocab_size]
        return logits, np.asarray(nxt)[:, 0].astype(np.int64)
