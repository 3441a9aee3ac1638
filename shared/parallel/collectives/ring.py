"""Ring collectives from send/recv (Patarasuk & Yuan 2009, §3): bandwidth-optimal all-reduce.

The tensor is cut into n chunks (`torch.tensor_split`: sizes differ by at most one, so any size
works, a 1-element tensor included; empty chunks are not sent). Rank i sends to i+1 and
receives from i-1, both posted at once (`comm_log.sendrecv`), so the ring cannot deadlock.

- Reduce-scatter, n-1 steps: at step s rank i sends its partial sum of chunk (i-s-1) mod n and
  adds the received chunk (i-s-2) mod n into its own. After step n-2, rank i holds the full sum
  of chunk i (torch.distributed's contract: rank i gets input i).
- All-gather, n-1 steps: at step s rank i forwards chunk (i-s) mod n, received one step before.
- All-reduce = the two: each rank sends 2(n-1)/n of the tensor, the lower bound of §2, in
  2(n-1) messages (the latency term that trees beat on small tensors).

fp16/bf16: partial sums travel in the tensor's dtype (what NCCL moves); each hop adds in fp32
and rounds once (torch's CPU add for half types), so a result carries n-1 roundings, like a
backend summing in the wire dtype. The tests bound that against a float64 sum and gloo's.
"""

from __future__ import annotations

import torch

from shared.parallel import comm_log
from shared.parallel.collectives._group import check_tensor, members, reduce_in_place


def _reduce_scatter_chunks(chunks: list[torch.Tensor], ranks: list[int], me: int) -> None:
    n = len(ranks)
    nxt, prv = ranks[(me + 1) % n], ranks[(me - 1) % n]
    for s in range(n - 1):
        out, into = chunks[(me - s - 1) % n], chunks[(me - s - 2) % n]
        buf = torch.empty_like(into)
        comm_log.sendrecv(out, nxt, buf, prv, tag=s)
        into.add_(buf)


def _all_gather_chunks(chunks: list[torch.Tensor], ranks: list[int], me: int) -> None:
    """Chunk `me` is filled on entry; every chunk is filled on return (in place)."""
    n = len(ranks)
    nxt, prv = ranks[(me + 1) % n], ranks[(me - 1) % n]
    for s in range(n - 1):
        into = chunks[(me - s - 1) % n]
        buf = into if into.is_contiguous() else torch.empty_like(into)
        # tags after the reduce-scatter's: each message matches its own step, whatever the
        # order in which the backend delivers them
        comm_log.sendrecv(chunks[(me - s) % n], nxt, buf, prv, tag=n + s)
        if buf is not into:
            into.copy_(buf)


def ring_reduce_scatter(output: torch.Tensor, input_list: list[torch.Tensor],
                        group=None) -> None:
    """`output` (on rank i) = the SUM over ranks of input_list[i]; inputs are not modified.
    Same contract as dist.reduce_scatter."""
    check_tensor(output, "output")
    ranks, me = members(group)
    if len(input_list) != len(ranks):
        raise ValueError(f"input_list must hold {len(ranks)} tensors (one per rank), "
                         f"got {len(input_list)}")
    if input_list[me].shape != output.shape or input_list[me].dtype != output.dtype:
        raise ValueError(f"output {tuple(output.shape)} {output.dtype} must match "
                         f"input_list[{me}] {tuple(input_list[me].shape)} {input_list[me].dtype}")
    chunks = [x.reshape(-1).clone() for x in input_list]
    _reduce_scatter_chunks(chunks, ranks, me)
    output.copy_(chunks[me].view(output.shape))


def ring_all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group=None) -> None:
    """tensor_list[j] = rank j's `tensor`, on every rank. Same contract as dist.all_gather."""
    check_tensor(tensor, "tensor")
    ranks, me = members(group)
    if len(tensor_list) != len(ranks):
        raise ValueError(f"tensor_list must hold {len(ranks)} tensors (one per rank), "
                         f"got {len(tensor_list)}")
    for j, x in enumerate(tensor_list):
        if x.shape != tensor.shape or x.dtype != tensor.dtype:
            raise ValueError(f"tensor_list[{j}] {tuple(x.shape)} {x.dtype} must match tensor "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
    tensor_list[me].copy_(tensor)
    _all_gather_chunks([x.view(-1) if x.is_contiguous() else x for x in tensor_list], ranks, me)


def ring_all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM over the group, like dist.all_reduce(t); returns `t`."""
    def body(flat, ranks, me):
        chunks = list(flat.tensor_split(len(ranks)))
        _reduce_scatter_chunks(chunks, ranks, me)
        _all_gather_chunks(chunks, ranks, me)
    return reduce_in_place(t, group, body)
