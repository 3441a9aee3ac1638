"""Point-to-point transfers between pipeline ranks: activations forward, gradients backward.

One batch per action. When action i ends, its send (if any) and the receive of a later action
are posted together with `dist.batch_isend_irecv`. Why together: NCCL runs a rank's p2p work
in issue order on one stream, so a receive posted alone, ahead of a send its peer is waiting
for, holds that send back forever (a deadlock). Inside one batch, an NCCL group, both
progress at once. The same code runs on gloo.

`lookahead` is how early a receive is posted. The batch that ends action i carries the
receive of action i + 1 + lookahead:
- lookahead = 0 (NCCL, the default there): that receive needs only messages the peer can
  send once it has this batch's send (validate.order). Any earlier and it would sit in the
  stream ahead of the send it waits for.
- lookahead = 1 (gloo, the default there): gloo runs each message on its own, so a receive
  can go in early. Measured here (gloo, 4 ranks on 2 cores): a receive posted only when needed
  waited 1-2 ms after the sender's send; posted one action ahead, about 0.2 ms.

Waits. Receives are waited for right before use. On gloo the wait blocks, with the group's
timeout, so a missing message raises instead of hanging. On a GPU, `wait()` only makes the
compute stream wait, so the host never blocks; the process group's watchdog enforces the
timeout there.

Sends are released as soon as they are known to be done, so 1F1B holds a bounded number of
send buffers whatever m is. A gloo send completes only after the peer posts the matching
receive, and gloo reports that only through a blocking `wait()`. So a send is waited for
(and its handle and tensor dropped) once a message from that peer proves the peer posted
the receive: the peer posts receives in schedule order, so "it sent what its action k made"
means "it posted every receive up to action k + 1 + lookahead". On a GPU a send is dropped
once its work reports completion; the host never blocks on it.

Every message is tagged by (what, microbatch, receiving stage), so gloo matches it whatever
the arrival order. NCCL ignores tags and matches in order; validate.fifo_order checks that
order per pair of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.parallel.pipeline.schedules import Action, Schedule

ACTIVATION, GRADIENT = 0, 1


def tag(schedule: Schedule, what: int, mb: int, stage: int) -> int:
    """Unique per message: `stage` is the receiving virtual stage."""
    return (what * schedule.num_microbatches + mb) * schedule.num_virtual + stage


def messages(schedule: Schedule, rank: int, a: Action):
    """(receive, send) of action `a` on `rank`: each (peer rank, tag), or None.
    F takes the activation from stage s-1 and sends its own to s+1; B and BW take the gradient
    from s+1 and send theirs to s-1; W talks to no one."""
    s, last = schedule.stage(rank, a.chunk), schedule.num_virtual - 1
    recv = send = None
    if a.kind == "F":
        if s > 0:
            recv = schedule.place(s - 1)[0], tag(schedule, ACTIVATION, a.mb, s)
        if s < last:
            send = schedule.place(s + 1)[0], tag(schedule, ACTIVATION, a.mb, s + 1)
    elif a.kind in ("B", "BW"):
        if s < last:
            recv = schedule.place(s + 1)[0], tag(schedule, GRADIENT, a.mb, s)
        if s > 0:
            send = schedule.place(s - 1)[0], tag(schedule, GRADIENT, a.mb, s - 1)
    return recv, send


@dataclass
class _Send:
    works: list
    tensor: torch.Tensor  # held until the send is done: the backend reads it until then
    peer: int
    consumer: int  # index, in the peer's action list, of the action that receives it


class P2P:
    """One rank's messages for one run of `schedule`. Receive buffers are shaped like `like`
    (one activation [b, T, D]; a gradient has the same shape)."""

    def __init__(self, schedule: Schedule, rank: int, like: torch.Tensor, timeout_s: float, *,
                 lookahead: int | None = None):
        if lookahead is None:
            lookahead = 0 if like.is_cuda else 1
        if lookahead not in (0, 1):
            raise ValueError(f"lookahead must be 0 or 1, got {lookahead!r}")
        self.schedule, self.rank, self.like = schedule, rank, like
        self.lookahead = lookahead
        self.timeout = timedelta(seconds=timeout_s)
        self.actions = schedule.ranks[rank]
        self.ops = [messages(schedule, rank, a) for a in self.actions]
        # For every message: (rank, index in its action list) of its sender and its receiver.
        self.sent_at: dict[int, tuple[int, int]] = {}
        self.received_at: dict[int, tuple[int, int]] = {}
        for r, acts in enumerate(schedule.ranks):
            for i, a in enumerate(acts):
                recv, send = messages(schedule, r, a)
                if recv:
                    self.received_at[recv[1]] = (r, i)
                if send:
                    self.sent_at[send[1]] = (r, i)
        self.heard: dict[int, int] = {}  # peer -> last action index it is known to have ended
        self.local: dict[int, torch.Tensor] = {}  # messages a rank sends itself (p == 1)
        self.posted: dict[int, tuple[torch.Tensor, list]] = {}  # tag -> (buffer, works)
        self.sending: list[_Send] = []
        self.peak_sends = 0  # most sends held at the end of an action

    def start(self) -> None:
        """Post the receives of the first 1 + lookahead actions (before the first action)."""
        self._batch(None, range(1 + self.lookahead))

    def recv(self, i: int) -> torch.Tensor | None:
        """The tensor action i receives (None if it receives nothing), once it has arrived."""
        if self.ops[i][0] is None:
            return None
        src, t = self.ops[i][0]
        if src == self.rank:
            return self.local.pop(t)
        buf, works = self.posted.pop(t)
        for work in works:
            if self.like.is_cuda:
                work.wait()  # the compute stream waits; the host goes on
            elif not work.wait(self.timeout):
                raise TimeoutError(f"rank {self.rank}: no message {t} from rank {src} "
                                   f"within {self.timeout}")
        self.heard[src] = max(self.heard.get(src, -1), self.sent_at[t][1])
        return buf

    def finish(self, i: int, out: torch.Tensor | None) -> None:
        """Action i has ended: post its send of `out` and the receive of action
        i + 1 + lookahead in one batch, then drop the sends known to be done."""
        if (self.ops[i][1] is None) != (out is None):
            raise ValueError(f"rank {self.rank}: action {self.actions[i]} sends "
                             f"{self.ops[i][1]}, got out={out is not None}")
        self._batch(None if out is None else (out, *self.ops[i][1]), [i + 1 + self.lookahead])
        self._release()
        self.peak_sends = max(self.peak_sends, len(self.sending))

    def flush(self) -> None:
        """Wait until every send has left, so its buffer may be freed or reused."""
        if self.posted:
            raise RuntimeError(f"rank {self.rank}: receives {sorted(self.posted)} were posted "
                               f"but never used")
        for s in self.sending:
            for work in s.works:
                work.wait() if self.like.is_cuda else work.wait(self.timeout)
        self.sending.clear()

    def _batch(self, send: tuple[torch.Tensor, int, int] | None, receivers) -> None:
        """One batch_isend_irecv: `send` (tensor, dst, tag) and the receives of the actions
        at indices `receivers`."""
        ops, sends, recvs = [], [], []
        if send is not None:
            out, dst, t = send
            if dst == self.rank:
                self.local[t] = out
            else:
                out = out.contiguous()
                ops.append(dist.P2POp(dist.isend, out, dst, tag=t))
                sends.append(_Send([], out, dst, self.received_at[t][1]))
        for j in receivers:
            if j < len(self.ops) and self.ops[j][0] is not None:
                src, t = self.ops[j][0]
                if src != self.rank:
                    buf = torch.empty_like(self.like)
                    ops.append(dist.P2POp(dist.irecv, buf, src, tag=t))
                    recvs.append((t, buf))
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        # gloo returns one work per op; NCCL one for the whole group (coalesced).
        per_op = [[w] for w in works] if len(works) == len(ops) else [works] * len(ops)
        for s, w in zip(sends, per_op, strict=False):
            s.works = w
            self.sending.append(s)
        for (t, buf), w in zip(recvs, per_op[len(sends):], strict=True):
            self.posted[t] = (buf, w)

    def _release(self) -> None:
        keep = []
        for s in self.sending:
            if self.like.is_cuda:  # NCCL: the work's event says it; never block the host
                done = all(w.is_completed() for w in s.works)
            else:  # gloo: done once the peer is known to have posted the receive
                done = s.consumer <= self.heard.get(s.peer, -1) + 1 + self.lookahead
                for w in s.works if done else ():  # returns once the bytes are across
                    w.wait(self.timeout)
            if not done:
                keep.append(s)
        self.sending = keep
