"""The specification: softmax(x)_i = exp(x_i − max x) / Σ_j exp(x_j − max x).

Written for clarity, not speed; tests run it in float64. A row that is all −inf has no
defined softmax and gives NaN, as torch.softmax does.
"""

from __future__ import annotations

import torch


def softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    m = x.amax(dim=dim, keepdim=True)   # subtract the max: exp never overflows ("safe")
    e = torch.exp(x - m)
    return e / e.sum(dim=dim, keepdim=True)
