"""Mixture-of-experts kernels: routing, token permutation, grouped matmul, balancing loss.

Triton on torch tensors (grouped_matmul, permute/unpermute), Pallas on JAX arrays
(grouped_matmul_pallas), the torch reference that specifies them (reference.py), and
grouped_matmul_torch, the same contract on torch's native grouped GEMM (the CPU path).
"""

from kernels.moe.grouped_matmul import Blocks, grouped_matmul
from kernels.moe.grouped_matmul_torch import grouped_matmul_torch
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
    "grouped_matmul_torch", "load_balancing_loss", "permute", "permute_reference", "routing_map",
    "topk_route", "unpermute", "unpermute_reference",
]
