"""Tree all-reduce from send/recv: reduce up a binary tree, broadcast back down, and the double
binary tree of Sanders, Speck & Träff (2009) that NCCL uses for its trees.

The binary tree is NCCL's `ncclGetBtree` layout, by rank bits: a rank whose lowest set bit is
b has children r - b/2 and r + b/2 (where they exist), so every odd rank is a leaf and rank 0
is the root, with one child. Depth ceil(log2 n): 2 log2(n) latencies per all-reduce instead of
the ring's 2(n-1), but every step moves the whole tensor, so the bandwidth term is S per level
(log2 n times the ring's 2(n-1)/n x S on the critical path).

Double binary tree (§3 of the paper): the tensor is cut in two and each half reduced over its
own tree. Tree 2 is tree 1 mirrored (r -> n-1-r) when n is even, shifted by one when n is odd,
so tree 1's leaves are tree 2's interior nodes: every rank sends and receives about S in total
instead of an interior node's 2S (children in, parent out, per half). The two halves run at once
on two threads (gloo matches point-to-point messages by (peer, tag); each tree has its own tags).
Not done here: NCCL's chunk pipelining down the tree, which turns the per-level S into ~S total.
"""

from __future__ import annotations

import threading

import torch

from shared.parallel import comm_log
from shared.parallel.collectives._group import reduce_in_place


def btree(n: int) -> list[int]:
    """parent[r] of every group index r (-1 for the root, index 0)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    parent = [-1] * n
    for r in range(1, n):
        bit = r & -r  # lowest set bit: r sits at that level
        up = (r ^ bit) | (bit << 1)  # the node one level up whose subtree holds r
        parent[r] = up if up < n else r ^ bit  # past the end: attach to the lower neighbour
    return parent


def double_btree(n: int) -> tuple[list[int], list[int]]:
    """(parent of tree 1, parent of tree 2): tree 2 mirrored (n even) or shifted (n odd)."""
    t1 = btree(n)
    if n % 2 == 0:
        def f(r):
            return n - 1 - r
        f_inv = f
    else:
        def f(r):
            return (r - 1) % n

        def f_inv(r):
            return (r + 1) % n
    # rank r plays node f(r) of tree 1; its parent is whoever plays t1[f(r)]
    t2 = [-1 if t1[f(r)] < 0 else f_inv(t1[f(r)]) for r in range(n)]
    return t1, t2


def children(parent: list[int], me: int) -> list[int]:
    return [r for r, p in enumerate(parent) if p == me]


def _reduce_broadcast(buf: torch.Tensor, parent: list[int], ranks: list[int], me: int,
                      tag: int) -> None:
    """All-reduce `buf` in place over the tree: sums flow to the root, the result back down."""
    kids = children(parent, me)
    tmp = torch.empty_like(buf)
    for c in kids:  # a parent receives its children one after another (one port)
        comm_log.recv(tmp, ranks[c], tag=tag)
        buf.add_(tmp)
    if parent[me] >= 0:
        comm_log.send(buf, ranks[parent[me]], tag=tag)
        comm_log.recv(buf, ranks[parent[me]], tag=tag + 1)
    for c in kids:
        comm_log.send(buf, ranks[c], tag=tag + 1)


def tree_all_reduce(t: torch.Tensor, group=None, *, double: bool = False) -> torch.Tensor:
    """In-place SUM over the group through a binary tree (double=True: the double binary
    tree, half the tensor on each); returns `t`."""
    def body(flat, ranks, me):
        n = len(ranks)
        if not double:
            _reduce_broadcast(flat, btree(n), ranks, me, tag=0)
        else:
            halves = flat.tensor_split(2)
            errors: list[BaseException] = []

            def run(half, parent, tag):
                try:
                    if half.numel():  # a 1-element tensor: its empty half has nothing to send
                        _reduce_broadcast(half, parent, ranks, me, tag)
                except BaseException as e:  # re-raised on the caller's thread below
                    errors.append(e)

            threads = [threading.Thread(target=run, args=(h, p, 2 * i))
                       for i, (h, p) in enumerate(zip(halves, double_btree(n), strict=True))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if errors:
                raise errors[0]

    return reduce_in_place(t, group, body)


def double_tree_all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """`tree_all_reduce(t, group, double=True)`."""
    return tree_all_reduce(t, group, double=True)
