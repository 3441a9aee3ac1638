"""Paged KV-cache kernels: PagedAttention (vLLM, arXiv 2309.06180) decode attention, split-K as
in Flash-Decoding, with GQA packing (arXiv 2305.13245); RoPE (RoFormer, arXiv 2104.09864); and
RoPE fused with the paged-cache write. Triton on torch tensors, Pallas on JAX arrays, and the
references that specify them.
"""

from kernels.paged.cache_write_triton import rope_cache_write, rope_cache_write_unfused
from kernels.paged.paged_attention_pallas import paged_attention_pallas
from kernels.paged.paged_attention_triton import paged_attention
from kernels.paged.reference import (
    paged_attention_reference,
    rope_cache_write_reference,
    rope_reference,
)
from kernels.paged.rope_pallas import rope_pallas
from kernels.paged.rope_triton import rope

__all__ = [
    "paged_attention",
    "paged_attention_pallas",
    "paged_attention_reference",
    "rope",
    "rope_cache_write",
    "rope_cache_write_reference",
    "rope_cache_write_unfused",
    "rope_pallas",
    "rope_reference",
]
