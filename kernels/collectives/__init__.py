"""Communication fused into kernels (Pallas TPU, remote DMA over a device mesh): all-gather
fused with the matmul that consumes it, and an all-reduce fused with the softmax after it."""

from kernels.collectives._args import races_found
from kernels.collectives.ag_matmul_pallas import ag_matmul, ag_matmul_reference
from kernels.collectives.allreduce_softmax_pallas import (
    allreduce_softmax,
    allreduce_softmax_reference,
)
from kernels.collectives.counts import Counts, ag_matmul_counts, allreduce_softmax_counts

__all__ = ["Counts", "ag_matmul", "ag_matmul_counts", "ag_matmul_reference",
           "allreduce_softmax", "allreduce_softmax_counts", "allreduce_softmax_reference",
           "races_found"]
