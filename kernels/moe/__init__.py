"""Mixture-of-experts kernels: routing, token permutation, grouped matmul, balancing loss.

Triton on torch tensors (grouped_matmul, permute/unpermute), Pallas on JAX arrays
(grouped_matmul_pallas), and the torch reference that specifies them (reference.py).
"""

from kernels.moe.grouped_matmul import Blocks, grouped_matmul
from kernels.moe.permute import permute, unpermute
from kernels.moe.reference import (
    grouped_matmul_reference,
    permute_reference,
    unpermute_reference,
)
from kernels.moe.routing import (
    Route,
    RoutingMap,
    expert_load,
    load_balancing_loss,
    routing_map,
    topk_route,
)

__all__ = [
    "Blocks", "Route", "RoutingMap", "expert_load", "grouped_matmul", "grouped_matmul_reference",
    "load_balancing_loss", "permute", "permute_reference", "routing_map", "topk_route",
    "unpermute", "unpermute_reference",
]
