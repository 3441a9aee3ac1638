"""The specification of the quantized matmuls: dequantize, then multiply.

y [M, N] = x [M, K] @ dequantize(qw)ᵀ, in fp32 (fp64 for a float64 x: the tests' reference),
returned in x's dtype. For "llm.int8" the
activations are quantized too (LLM.int8() §3.2, Eq. 7-8): columns of x holding any value with
magnitude above the threshold go through a 16-bit matmul with the matching weight rows; every
other column is int8 per row of x (vector-wise absmax) against the int8 weight, the int32 sum
rescaled by the outer product of the row and column scales.
"""

from __future__ import annotations

import torch

from kernels.quant._args import check_matmul_args
from kernels.quant.formats import FORMATS, QuantizedWeight, dequantize_t
from kernels.validate import FLOAT_DTYPES


def split_outliers(x: torch.Tensor, threshold: float):
    """(x_int8 [M, K] int8, row scale [M] fp32, outlier column mask [K] bool) of LLM.int8()."""
    outlier = (x.abs() > threshold).any(0)
    regular = torch.where(outlier[None, :], 0, x.float())
    row_scale = (regular.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    # row_scale is fp32 whatever x is: the kernel receives it so, and the float64 reference
    # must round x to int8 exactly as the kernel's launcher did
    x_int8 = torch.round(regular / row_scale[:, None]).clamp(-127, 127).to(torch.int8)
    return x_int8, row_scale, outlier


def llm_int8_outlier_part(x: torch.Tensor, qw: QuantizedWeight, outlier: torch.Tensor):
    """The 16-bit half of the decomposition: x[:, outliers] @ W[:, outliers]ᵀ in fp32 [M, N].

    Only the outlier rows of the stored weight are dequantized (bitsandbytes does the same)."""
    cols = outlier.nonzero().flatten()
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    w_rows = qw.data[cols].to(wide) * qw.scale.to(wide)[None, :]          # [n_out, N]
    return x[:, cols].to(wide) @ w_rows


def quantized_matmul_reference(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """x [M, K] @ dequantize(qw)ᵀ -> [M, N] in x's dtype (fp32 math; llm.int8 as above)."""
    check_matmul_args(x, qw, FORMATS, (*FLOAT_DTYPES, torch.float64))
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    if qw.fmt == "llm.int8":
        x_int8, row_scale, outlier = split_outliers(x, qw.threshold)
        acc = x_int8.double() @ qw.data.double()        # the int32 sum, exactly
        y = acc.to(wide) * row_scale.to(wide)[:, None] * qw.scale.to(wide)[None, :]
        y = y + llm_int8_outlier_part(x, qw, outlier)
        return y.to(x.dtype)
    return (x.to(wide) @ dequantize_t(qw).to(wide)).to(x.dtype)
