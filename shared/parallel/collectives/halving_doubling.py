"""Recursive halving-doubling all-reduce (Rabenseifner; Thakur, Rabenseifner & Gropp 2005, §4.4)
and the pairwise all-to-all (ibid. §3.5), from send/recv.

Halving-doubling on p = 2^k ranks: reduce-scatter by recursive halving (at distance p/2, p/4,
..., 1, swap half of the current range with the partner r XOR d and keep the summed other half),
then all-gather by recursive doubling (the same partners in reverse, swapping the ranges back).
2 log2(p) messages, like a tree, and 2(p-1)/p x S bytes per rank, like a ring: the best of both
in the α-β model, when p is a power of two.

Any other n: the first 2r ranks (r = n - p) pair up; each even one hands its whole tensor to its
odd neighbour and sits out, the p survivors run the above, and the odd ones hand the result
back (the paper's fix, two extra full-size messages on those ranks).
"""

from __future__ import annotations

import torch

from shared.parallel import comm_log
from shared.parallel.collectives._group import check_tensor, members, reduce_in_place


def _core(flat: torch.Tensor, idx: int, p: int, peer) -> None:
    """Halving-doubling on `p` (a power of two) survivors; `peer(j)` is survivor j's rank."""
    lo, hi, stack = 0, flat.numel(), []
    d = p // 2
    while d >= 1:  # halving: reduce-scatter
        mid = lo + (hi - lo) // 2
        keep, give = ((lo, mid), (mid, hi)) if idx & d == 0 else ((mid, hi), (lo, mid))
        buf = torch.empty(keep[1] - keep[0], dtype=flat.dtype)
        comm_log.sendrecv(flat[give[0]:give[1]], peer(idx ^ d), buf, peer(idx ^ d), tag=d)
        flat[keep[0]:keep[1]].add_(buf)
        stack.append((keep, give, d))
        lo, hi = keep
        d //= 2
    for keep, give, d in reversed(stack):  # doubling: all-gather, the same pairs in reverse
        comm_log.sendrecv(flat[keep[0]:keep[1]], peer(idx ^ d), flat[give[0]:give[1]],
                          peer(idx ^ d), tag=p + d)


def halving_doubling_all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM over the group by recursive halving and doubling; returns `t`."""
    return reduce_in_place(t, group, _halving_doubling)


def _halving_doubling(flat: torch.Tensor, ranks: list[int], me: int) -> None:
    n = len(ranks)
    p = 1 << (n.bit_length() - 1)  # largest power of two <= n
    r = n - p
    fold = 2 * p + 1  # tags past the core's (which stay below 2p)
    if me < 2 * r and me % 2 == 0:  # hand my tensor to my odd neighbour, get the sum back
        comm_log.send(flat, ranks[me + 1], tag=fold)
        comm_log.recv(flat, ranks[me + 1], tag=fold + 1)
    else:
        if me < 2 * r:
            tmp = torch.empty_like(flat)
            comm_log.recv(tmp, ranks[me - 1], tag=fold)
            flat.add_(tmp)
        idx = me // 2 if me < 2 * r else me - r  # my place among the p survivors

        def peer(j):  # survivor j's rank: the odd one of a pair, or shifted down by r
            return ranks[2 * j + 1] if j < r else ranks[j + r]

        _core(flat, idx, p, peer)
        if me < 2 * r:
            comm_log.send(flat, ranks[me - 1], tag=fold + 1)



def all_to_all(output_list: list[torch.Tensor], input_list: list[torch.Tensor],
               group=None) -> None:
    """output_list[j] = rank j's input_list[me]; like dist.all_to_all, but chunks may differ in
    size (gloo's requires equal ones). Pairwise exchange: at step s, send to me+s and receive
    from me-s, so every step is a permutation and no link carries two messages (§3.5)."""
    ranks, me = members(group)
    n = len(ranks)
    for name, lst in (("output_list", output_list), ("input_list", input_list)):
        if len(lst) != n:
            raise ValueError(f"{name} must hold {n} tensors (one per rank), got {len(lst)}")
        for j, x in enumerate(lst):
            check_tensor(x, f"{name}[{j}]")
            if not x.is_contiguous():
                raise ValueError(f"{name}[{j}] must be contiguous")
    output_list[me].copy_(input_list[me])
    for s in range(1, n):
        dst, src = (me + s) % n, (me - s) % n
        comm_log.sendrecv(input_list[dst], ranks[dst], output_list[src], ranks[src], tag=s)
