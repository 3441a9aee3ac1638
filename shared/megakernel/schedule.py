"""From a task graph to what the persistent kernel reads: worker queues and an int64 task table.

`assign` is MPK's static schedule in its simplest form: the tasks in a topological order, dealt
round-robin to the workers. Each queue is then sorted by that order, so the earliest unfinished
task overall always heads its queue with every producer done: in-order workers cannot deadlock
(validate.check_schedule verifies it anyway). `pack` lays out the weights and activations as
flat buffers and turns each task's names into element offsets (kernels/megakernel documents
the table's columns).
"""

from __future__ import annotations

import torch

from kernels.megakernel.persistent_triton import ARGS, OPS, TASK_WIDTH, TRIGGER, WAIT0
from shared.megakernel.validate import GraphError, check_schedule, validate
from shared.models.llama import Llama

ACTIVATIONS = ("x", "xn", "qkv", "attn", "o", "act", "down", "logits")


def assign(graph: dict, workers: int, order: list[int] | None = None) -> list[list[int]]:
    """Round-robin over a topological order (default: validate's)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    order = validate(graph, dataflow=False) if order is None else order
    queues: list[list[int]] = [[] for _ in range(workers)]
    for rank, t in enumerate(order):
        queues[rank % workers].append(t)
    check_schedule(graph, queues)
    return queues


def weight_layout(model: Llama) -> tuple[torch.Tensor, dict[str, int]]:
    """All weights in one flat tensor (the model's dtype) and each one's element offset. A
    layer's q, k and v projections are stacked into one [(H + 2Hkv)·hd, D] matrix."""
    named: dict[str, torch.Tensor] = {"embed": model.embed.weight}
    for i, blk in enumerate(model.layers):
        a, f = blk.attn, blk.ffn
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        layer = {"attn_norm": blk.attn_norm.weight, "qkv": qkv, "o_proj": a.o_proj.weight,
                 "ffn_norm": blk.ffn_norm.weight, "gate_proj": f.gate_proj.weight,
                 "up_proj": f.up_proj.weight, "down_proj": f.down_proj.weight}
        named |= {f"layers.{i}.{k}": v for k, v in layer.items()}
    named |= {"norm": model.norm.weight, "lm_head": model.lm_head.weight}
    offsets, at = {}, 0
    for name, w in named.items():
        offsets[name] = at
        at += w.numel()
    flat = torch.cat([w.detach().reshape(-1) for w in named.values()])
    return flat, offsets


def workspace_layout(graph: dict) -> tuple[int, dict[str, int]]:
    """Element offsets of the float32 activations in one workspace; its size."""
    offsets, at = {}, 0
    for name in ACTIVATIONS:
        rows, cols = graph["buffers"][name]
        offsets[name] = at
        at += rows * cols
    return at, offsets


def _args(task: dict, graph: dict, w: dict, ws: dict, cache_len: int) -> list[int]:
    m, B, a = graph["model"], graph["batch"], task["args"]
    cols = {k: v[1] for k, v in graph["buffers"].items()}
    hd = m["dim"] // m["n_heads"]
    op = task["op"]
    if op == "embed":
        return [w["embed"], ws["x"], m["dim"]]
    if op == "rmsnorm":
        return [ws[a["src"]], w[a["weight"]], ws[a["dst"]], m["dim"]]
    if op in ("matmul", "swiglu"):
        k, col = a["k"], a["col"]
        out = [ws[a["src"]], cols[a["src"]], k, w[a["weights"][0]] + col * k, ws[a["dst"]] + col,
               cols[a["dst"]], a["width"]]
        return out + ([w[a["weights"][1]] + col * k] if op == "swiglu" else [])
    if op in ("rope", "attention"):
        b, h, group = a["b"], a["kv_head"], a["group"]
        row = ws["qkv"] + b * cols["qkv"]
        q = row + h * group * hd
        cache = ((task["layer"] * B + b) * m["n_kv_heads"] + h) * cache_len * hd
        if op == "rope":
            k = row + m["n_heads"] * hd + h * hd
            return [q, k, k + m["n_kv_heads"] * hd, group, cache, b]
        return [q, group, cache, ws["attn"] + b * cols["attn"] + h * group * hd, b]
    if op == "add":
        c = a["col"]
        return [ws[a["a"]] + c, ws[a["b"]] + c, ws[a["dst"]] + c, cols[a["dst"]], a["width"]]
    if op == "argmax":
        return [ws["logits"], m["vocab_size"]]
    raise GraphError(f"task {task['id']}: op {op!r} has no kernel body")


def pack(graph: dict, w_offsets: dict[str, int], cache_len: int) -> torch.Tensor:
    """The int64 task table [n_tasks, TASK_WIDTH] (kernels/megakernel/persistent_triton.py)."""
    _, ws = workspace_layout(graph)
    table = torch.full((len(graph["tasks"]), int(TASK_WIDTH)), -1, dtype=torch.int64)
    for t in graph["tasks"]:
        if len(t["waits"]) > 2 or len(t["triggers"]) != 1:
            raise GraphError(f"task {t['id']}: the kernel takes ≤ 2 waits and 1 trigger, got "
                             f"{len(t['waits'])} and {len(t['triggers'])}")
        row = table[t["id"]]
        row[0] = OPS[t["op"]]
        args = _args(t, graph, w_offsets, ws, cache_len)
        a0 = int(ARGS)
        row[a0:a0 + len(args)] = torch.tensor(args, dtype=torch.int64)
        for j, e in enumerate(t["waits"]):
            row[int(WAIT0) + 2 * j] = e
            row[int(WAIT0) + 2 * j + 1] = graph["events"][e]["need"]
        row[int(TRIGGER)] = t["triggers"][0]
    return table


def queue_tensors(queues: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(QUEUE, QSTART): the queues concatenated, and where each worker's starts (+ the end)."""
    flat = [t for q in queues for t in q]
    starts = [0]
    for q in queues:
        starts.append(starts[-1] + len(q))
    return torch.tensor(flat, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32)
