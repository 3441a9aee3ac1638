"""Sampling for decoding: Gumbel-max sampling and the speculative-decoding acceptance rule.

gumbel_sample / speculative_accept (Triton, torch tensors) and their references
(gumbel_sample_reference / speculative_accept_reference, the specification).
"""

from kernels.sampling.reference import gumbel_sample_reference, speculative_accept_reference
from kernels.sampling.triton import gumbel_sample, speculative_accept

__all__ = ["gumbel_sample", "gumbel_sample_reference", "speculative_accept",
           "speculative_accept_reference"]
