"""Collectives built from send/recv on torch.distributed ranks (gloo on CPU), logged through
`shared.parallel.comm_log`: the ring (bandwidth-optimal), trees (latency-optimal) and
recursive halving-doubling, each with torch.distributed's in-place SUM contract."""

from shared.parallel.collectives.ring import ring_all_gather, ring_all_reduce, ring_reduce_scatter

__all__ = ["ring_all_gather", "ring_all_reduce", "ring_reduce_scatter"]
