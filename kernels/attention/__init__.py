"""Attention: FlashAttention (FA1 arXiv 2205.14135, FA2 arXiv 2307.08691) three ways.

- `flash_attention`: Triton on torch tensors, forward + FA2 backward (flash.py,
  triton_fwd.py, triton_bwd.py);
- `flash_attention_pallas`: Pallas on JAX arrays, jax.custom_vjp (pallas.py);
- `attention_reference`: the specification (reference.py);
- `standard_attention`: the paper's baseline as Triton kernels that write S and P to global
  memory (standard.py), so its traffic is counted the same way as the flash kernels'.
"""

from kernels.attention._args import BlockSizes
from kernels.attention.flash import flash_attention
from kernels.attention.pallas import flash_attention_pallas
from kernels.attention.reference import attention_reference
from kernels.attention.standard import standard_attention

__all__ = [
    "BlockSizes",
    "attention_reference",
    "flash_attention",
    "flash_attention_pallas",
    "standard_attention",
]
