"""Softmax: the online normaliser (Milakov & Gimelshein 2018) three ways, and the baseline.

softmax (Triton, torch), softmax_pallas (Pallas, JAX), softmax_reference (the specification),
safe_softmax (Triton, the three-pass Algorithm 2 the paper improves on); softmax_xla_online and
softmax_xla_safe (plain jitted JAX, for compiled wall-clock on a CPU).
"""

from kernels.softmax.pallas import softmax_pallas
from kernels.softmax.reference import softmax_reference
from kernels.softmax.triton import safe_softmax, softmax
from kernels.softmax.xla import softmax_xla_online, softmax_xla_safe

__all__ = ["softmax", "safe_softmax", "softmax_pallas", "softmax_reference",
           "softmax_xla_online", "softmax_xla_safe"]
