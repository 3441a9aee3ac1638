"""Every message a rank sends, counted: logged wrappers over torch.distributed.

    with comm_log.recording() as log:
        comm_log.all_reduce(grad)
    log.count("all_reduce"), log.bytes("all_reduce")

One record per call: (op, bytes sent, bytes received, peer, group size, payload bytes).
- Point-to-point (`send`, `recv`, `sendrecv`) records what crossed the wire, exactly.
- A backend collective records `payload` (the tensor's bytes: nccl-tests' "size") and, as
  sent/received, what one rank moves under the bandwidth-optimal ring (`ring_volume`):
  2(n-1)/n x payload for all-reduce, (n-1)/n for reduce-scatter and all-gather (ZeRO §7's
  accounting). The backend may move more: gloo's reduce-scatter is an all-reduce plus a slice
  (docs/cpu-notes). What our own algorithms move is counted from their sends, not modelled.

Recorders are per process (each rank has its own); a lock guards them, so a rank whose
threads communicate (overlapped buckets) still counts each message once per open recorder.
Recorders nest: a message counts in every recorder open around it.
Waits use `launch.TIMEOUT_S` (or timeout_s): a peer that never answers raises TimeoutError,
never hangs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.parallel import launch

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all",
       "send", "recv", "sendrecv")


@dataclass(frozen=True)
class Comm:
    op: str
    sent: int        # bytes this rank put on the wire
    received: int    # bytes this rank took off it
    peer: int | None  # the rank (global) a point-to-point op sends to or receives from
    group_size: int
    payload: int     # bytes of the caller's tensor (nccl-tests' "size")


@dataclass
class CommLog:
    records: list[Comm] = field(default_factory=list)

    def _select(self, op: str | None) -> list[Comm]:
        if op is not None and op not in OPS:
            raise ValueError(f"op must be one of {OPS} or None, got {op!r}")
        return [r for r in self.records if op is None or r.op == op]

    def count(self, op: str | None = None) -> int:
        """How many calls of `op` (every op when None)."""
        return len(self._select(op))

    def bytes(self, op: str | None = None, *, received: bool = False) -> int:
        """Bytes this rank sent (or, with received=True, received) in calls of `op`."""
        return sum(r.received if received else r.sent for r in self._select(op))

    def peers(self, op: str | None = None) -> set[int]:
        return {r.peer for r in self._select(op) if r.peer is not None}


_LOCK = threading.Lock()
_OPEN: list[CommLog] = []


@contextmanager
def recording() -> Iterator[CommLog]:
    """Record every call through this module, in this process, until the block ends."""
    log = CommLog()
    with _LOCK:
        _OPEN.append(log)
    try:
        yield log
    finally:
        with _LOCK:
            _OPEN.remove(log)


def record(op: str, sent: int, received: int, peer: int | None, group_size: int,
           payload: int) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    c = Comm(op, int(sent), int(received), peer, int(group_size), int(payload))
    with _LOCK:
        for log in _OPEN:
            log.records.append(c)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check(t, name: str = "t") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def ring_volume(op: str, numel: int, world: int, itemsize: int) -> tuple[int, int]:
    """(sent, received) bytes per rank of the ring algorithm on a payload of `numel` elements
    (the all-gather's payload is its output; reduce-scatter's is its input). Each of the n-1
    steps moves one 1/n chunk; all-reduce is reduce-scatter then all-gather, twice that."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    steps = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "all_to_all": 1}
    if op == "broadcast":  # a pipelined chain: every rank but the last forwards it once
        return numel * itemsize, numel * itemsize
    if op not in steps:
        raise ValueError(f"no ring volume for op {op!r}")
    v = steps[op] * (world - 1) * numel * itemsize // world
    return v, v


def _world(group) -> int:
    return dist.get_world_size(group)


def _collective(op: str, t: torch.Tensor, payload_numel: int, group) -> None:
    n = _world(group)
    sent, recv = ring_volume(op, payload_numel, n, t.element_size())
    record(op, sent, recv, None, n, payload_numel * t.element_size())


def all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> None:
    """dist.all_reduce in place, logged."""
    _check(t)
    dist.all_reduce(t, op=op, group=group)
    _collective("all_reduce", t, t.numel(), group)


def all_gather(tensor_list: list[torch.Tensor], t: torch.Tensor, group=None) -> None:
    """dist.all_gather into `tensor_list` (one tensor per rank), logged."""
    _check(t)
    dist.all_gather(tensor_list, t, group=group)
    _collective("all_gather", t, sum(x.numel() for x in tensor_list), group)


def reduce_scatter(output: torch.Tensor, input_list: list[torch.Tensor], group=None,
                   op=dist.ReduceOp.SUM) -> None:
    """dist.reduce_scatter: `output` on rank r gets the reduction of every rank's
    input_list[r]; logged."""
    _check(output, "output")
    dist.reduce_scatter(output, input_list, op=op, group=group)
    _collective("reduce_scatter", output, sum(x.numel() for x in input_list), group)


def broadcast(t: torch.Tensor, src: int, group=None) -> None:
    """dist.broadcast from global rank `src`, logged (the sender sends, the others receive)."""
    _check(t)
    dist.broadcast(t, src=src, group=group)
    n, b = _world(group), _nbytes(t)
    me = dist.get_rank()
    record("broadcast", b if me == src else 0, 0 if me == src else b, None, n, b)


def all_to_all(outputs: list[torch.Tensor], inputs: list[torch.Tensor], group=None) -> None:
    """dist.all_to_all: inputs[j] goes to rank j, outputs[j] comes from rank j; logged with
    exactly the bytes that leave and arrive (a rank's own chunk stays home)."""
    dist.all_to_all(outputs, inputs, group=group)
    me = dist.get_rank(group)
    sent = sum(_nbytes(x) for j, x in enumerate(inputs) if j != me)
    recv = sum(_nbytes(x) for j, x in enumerate(outputs) if j != me)
    record("all_to_all", sent, recv, None, _world(group), sum(_nbytes(x) for x in inputs))


def _wait(works, what: str, timeout_s: float | None) -> None:
    # None: launch.TIMEOUT_S read now, so a worker may shorten it for a run
    timeout_s = launch.TIMEOUT_S if timeout_s is None else timeout_s
    msg = f"rank {dist.get_rank()}: {what} not done within {timeout_s} s"
    for w in works:
        try:
            done = w.wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:  # gloo raises its own "Timed out waiting" error
            if "Timed out" in str(e):
                raise TimeoutError(msg) from e
            raise
        if not done:
            raise TimeoutError(msg)


def send(t: torch.Tensor, dst: int, tag: int = 0, timeout_s: float | None = None) -> None:
    """Send `t` to global rank `dst`; returns once the peer has it (or raises on timeout)."""
    _check(t)
    _wait([dist.isend(t.contiguous(), dst, tag=tag)], f"send to {dst}", timeout_s)
    record("send", _nbytes(t), 0, dst, _world(None), _nbytes(t))


def recv(t: torch.Tensor, src: int, tag: int = 0, timeout_s: float | None = None) -> None:
    """Receive into `t` (contiguous) from global rank `src`, or raise TimeoutError."""
    _check(t)
    if not t.is_contiguous():
        raise ValueError("t must be contiguous to receive into it")
    _wait([dist.irecv(t, src, tag=tag)], f"recv from {src}", timeout_s)
    record("recv", 0, _nbytes(t), src, _world(None), _nbytes(t))


def sendrecv(out: torch.Tensor, dst: int, into: torch.Tensor, src: int, tag: int = 0,
             timeout_s: float | None = None) -> None:
    """Send `out` to `dst` while receiving `into` from `src`, posted together
    (batch_isend_irecv), so a ring where every rank does this at once cannot deadlock the way
    n blocking sends would. Empty tensors are skipped (both ends know the sizes)."""
    _check(out, "out")
    _check(into, "into")
    if not into.is_contiguous():
        raise ValueError("into must be contiguous to receive into it")
    ops = []
    if out.numel():
        ops.append(dist.P2POp(dist.isend, out.contiguous(), dst, tag=tag))
    if into.numel():
        ops.append(dist.P2POp(dist.irecv, into, src, tag=tag))
    if ops:
        _wait(dist.batch_isend_irecv(ops), f"sendrecv (to {dst}, from {src})", timeout_s)
    record("sendrecv", _nbytes(out), _nbytes(into), dst, _world(None), _nbytes(out))
