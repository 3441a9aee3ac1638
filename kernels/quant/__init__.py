"""Weight quantization: LLM.int8() (arXiv 2208.07339), group-wise int4 as GPTQ stores it (arXiv
2210.17323), NF4 with double quantization (QLoRA, arXiv 2305.14314), and matmuls that
dequantize inside their K loop: Triton on torch tensors, Pallas on JAX arrays, and the
dequantize-then-matmul reference that specifies them.
"""

from kernels.quant.formats import FORMATS, NF4_CODE, QuantizedWeight, quantize
from kernels.quant.matmul_pallas import quantized_matmul_pallas
from kernels.quant.matmul_triton import quantized_matmul
from kernels.quant.reference import quantized_matmul_reference

__all__ = ["FORMATS", "NF4_CODE", "QuantizedWeight", "quantize", "quantized_matmul",
           "quantized_matmul_pallas", "quantized_matmul_reference"]
