"""The persistent mega-kernel: one launch runs a whole decode step's task graph (MPK §4).

The grid is the worker count (on a GPU, one worker per SM). Worker w walks its queue
QUEUE[QSTART[w]:QSTART[w+1]] — task ids assigned ahead of time in topological order — and for
each task: spin-waits until each awaited event counter reaches need·epoch (atomic loads with
acquire semantics), runs the task body (tasks_triton.py), then increments its output event
(release, after a CTA barrier so every warp's stores are done). Counters are never reset: step
`epoch` waits for need·epoch, so one launch per step suffices — no memset kernel.

Task table TASKS: int64 [n_tasks, TASK_WIDTH] = (op, ten arguments, wait event 0, need 0,
wait event 1, need 1, trigger event); event −1 = none. OPS numbers the task bodies.

Triton's interpreter runs programs one after another, so a worker that waits on an event only a
later program triggers would spin forever. Each wait therefore gives up after `max_spins`
reads, records the task in ERR and ends its worker; the launcher raises. With one worker (the
CPU runs) the queue is a topological order and no wait ever spins. The same code with one
worker per SM is the GPU kernel.

The kernel-per-operator baseline launches this same kernel once per operator, grid = that
operator's tasks, one task per program: every wait is already satisfied by the launch before
(stream order is the device-wide barrier), so it differs only in how the work is launched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.megakernel.tasks_triton import (
    add_task,
    argmax_task,
    attention_task,
    embed_task,
    matmul_task,
    rmsnorm_task,
    rope_task,
)

OPS = {"embed": 1, "rmsnorm": 2, "matmul": 3, "swiglu": 4, "rope": 5, "attention": 6, "add": 7,
       "argmax": 8}
# Columns of the task table; tl.constexpr so the kernel reads the same names as the packer.
TASK_WIDTH = tl.constexpr(16)
ARGS, WAIT0, WAIT1, TRIGGER = tl.constexpr(1), tl.constexpr(11), tl.constexpr(13), tl.constexpr(15)
BLOCK_B = 16                         # decode rows per tile: B ≤ 16, padded for tl.dot


@triton.jit
def _wait(EVENTS, ev, need, epoch, max_spins):
    """Spin until EVENTS[ev] ≥ need·epoch; returns False if it gave up (ev < 0: no wait)."""
    ok = True
    if ev >= 0:
        target = need * epoch
        seen = tl.atomic_add(EVENTS + ev, 0, sem="acquire")   # an atomic load
        spins = 0
        while (seen < target) & (spins < max_spins):
            seen = tl.atomic_add(EVENTS + ev, 0, sem="acquire")
            spins += 1
        ok = seen >= target
    return ok


# Triton specializes an int argument equal to 1 or divisible by 16 into a separate binary: epoch
# grows every step (1, 2, ..., 16, ...) and batch is 1 at decode, so each would trigger a fresh
# compile mid-run, and the binary that ran would not be the one `kclub compile` checked.
@triton.jit(do_not_specialize=["epoch", "batch"])
def megakernel_decode_kernel(
    TASKS, QUEUE, QSTART, EVENTS, ERR,          # the schedule and its counters
    WS, W, KC, VC, COS, SIN, TOK, OUT, POS,     # workspace, weights, caches, tokens
    epoch, max_spins, batch, head_dim, eps, sm_scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    MM_STAGES: tl.constexpr, KV_STAGES: tl.constexpr,
):
    worker = tl.program_id(0)
    i = tl.load(QSTART + worker)
    end = tl.load(QSTART + worker + 1)
    while i < end:
        task = tl.load(QUEUE + i).to(tl.int64)
        rec = TASKS + task * TASK_WIDTH
        ok = _wait(EVENTS, tl.load(rec + WAIT0), tl.load(rec + WAIT0 + 1), epoch, max_spins)
        ok = ok & _wait(EVENTS, tl.load(rec + WAIT1), tl.load(rec + WAIT1 + 1), epoch, max_spins)
        if ok:
            op = tl.load(rec)
            a = rec + ARGS
            if op == 1:
                embed_task(WS, W, TOK, a, batch, BLOCK_R)
            elif op == 2:
                rmsnorm_task(WS, W, a, batch, eps, BLOCK_R)
            elif op == 3:
                matmul_task(WS, W, a, batch, False, BLOCK_B, BLOCK_N, BLOCK_K, MM_STAGES)
            elif op == 4:
                matmul_task(WS, W, a, batch, True, BLOCK_B, BLOCK_N, BLOCK_K, MM_STAGES)
            elif op == 5:
                rope_task(WS, KC, VC, COS, SIN, POS, a, head_dim, BLOCK_G, BLOCK_D)
            elif op == 6:
                attention_task(WS, KC, VC, POS, a, head_dim, sm_scale, BLOCK_G, BLOCK_S,
                               BLOCK_D, KV_STAGES)
            elif op == 7:
                add_task(WS, a, batch, BLOCK_B, BLOCK_N)
            elif op == 8:
                argmax_task(WS, OUT, a, batch, BLOCK_R)
            tl.debug_barrier()   # every warp's stores issued before the release below
            trig = tl.load(rec + TRIGGER)
            if trig >= 0:
                tl.atomic_add(EVENTS + trig, 1, sem="release")
            i += 1
        else:
            tl.atomic_max(ERR, task.to(tl.int32) + 1)   # which task starved, for the host
            i = end


def gpu_blocks(dtype: torch.dtype, head_dim: int, group: int, tile: int = 64) -> dict:
    """The constexprs a GPU run uses (`kclub compile --family megakernel` builds exactly these:
    16-bit, no spills on sm_80/sm_90, 226–248 registers, 96 KB of shared memory). Weights:
    [128, 64] 16-bit tiles (16 KB), 5 stages, so 4 tiles, 64 KB, are in flight per SM
    (tasks_triton's docstring does the Little's-law sum); [256, 64] tiles at 3 stages spilled. fp32
    weights take 64-deep tiles, the same bytes a stage. K/V: 32 keys a tile (64 spilled at
    d = 128), 4 stages. Row-wise ops (embed, RMSNorm, argmax): 2048 columns of one row a step
    (4096 spilled on sm_90)."""
    return {"BLOCK_N": tile, "BLOCK_K": 128 if dtype.itemsize == 2 else 64, "BLOCK_R": 2048,
            "BLOCK_G": _pow2(group), "BLOCK_S": 32, "BLOCK_D": _pow2(head_dim),
            "MM_STAGES": 5, "KV_STAGES": 4}


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (n - 1).bit_length())


def launch(tables: dict, state: dict, *, queue: torch.Tensor, qstart: torch.Tensor,
           epoch: int, max_spins: int, blocks: dict) -> None:
    """One launch over len(qstart) − 1 workers. `tables`: TASKS, EVENTS, ERR (schedule.py);
    `state`: WS, W, KC, VC, COS, SIN, TOK, OUT, POS and batch, head_dim, eps, sm_scale;
    `blocks`: gpu_blocks' keys."""
    workers = qstart.numel() - 1
    s = state
    megakernel_decode_kernel[(workers,)](
        tables["TASKS"], queue, qstart, tables["EVENTS"], tables["ERR"],
        s["WS"], s["W"], s["KC"], s["VC"], s["COS"], s["SIN"], s["TOK"], s["OUT"], s["POS"],
        epoch, max_spins, s["batch"], s["head_dim"], s["eps"], s["sm_scale"],
        BLOCK_B=BLOCK_B, **blocks, num_warps=8, num_stages=2)
