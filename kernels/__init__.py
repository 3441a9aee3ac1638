"""Kernel Club's device kernels: one package per op family (Triton, Pallas, reference).

Importing this package first chooses Triton's interpreter when there is no GPU (kernels.device).
"""

from kernels import device

__all__ = ["device"]
