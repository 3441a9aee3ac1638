"""Collectives built from send/recv on torch.distributed ranks (gloo on CPU), logged through
`shared.parallel.comm_log`: the ring (bandwidth-optimal), trees (latency-optimal) and
recursive halving-doubling, each with torch.distributed's in-place SUM contract."""

from shared.parallel.collectives.halving_doubling import all_to_all, halving_doubling_all_reduce
from shared.parallel.collectives.ring import ring_all_gather, ring_all_reduce, ring_reduce_scatter
from shared.parallel.collectives.tree import double_tree_all_reduce, tree_all_reduce

__all__ = ["all_to_all", "double_tree_all_reduce", "halving_doubling_all_reduce",
           "ring_all_gather", "ring_all_reduce", "ring_reduce_scatter", "tree_all_reduce"]
