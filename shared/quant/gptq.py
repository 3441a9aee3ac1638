"""GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323): int4 with second-order error compensation.

Round-to-nearest (RTN) quantizes every weight alone. GPTQ quantizes the columns of W [N, K]
(one input feature k at a time, all N rows at once) and, after each, spreads that column's
rounding error over the columns not yet quantized so that the layer's output on calibration
inputs X changes least: it minimises ‖XWᵀ − XQᵀ‖² with the Hessian H = 2XᵀX (§3, the OBQ
update, Eq. 2-3). The pieces, as the paper lays them out:
- One inverse Hessian for all rows, in Cholesky form (§4 "Step 3"): with Hinv = chol(H⁻¹)ᵀ
  (upper), the update after column i is W[:, i:] −= err_i · Hinv[i, i:] with
  err_i = (w_i − q_i) / Hinv[i, i]. A damping of 1% of the mean diagonal keeps it stable.
- Lazy batch updates (§4 "Step 2"): columns go in blocks of 128; inside a block the updates touch
  only the block, and the block's accumulated errors update the rest of W in one matmul.
- Groups: each group's scale and zero come from the weights as they stand when the group's first
  column is reached (already compensated), as in the reference code.
- Act-order (the reference's --act-order, "desc_act"): columns in order of decreasing H[k, k], the
  features with the largest inputs first. Group constants are then fixed up front from the
  original W ("static groups"), so the result keeps the contiguous int4 format of kernels/quant.
"""

from __future__ import annotations

import torch

from kernels.quant.formats import (
    QuantizedWeight,
    from_int4_codes,
    int4_codes,
    int4_params,
)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 XᵀX / n in float64 from calibration inputs x [..., K] of one linear layer."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"x must be a tensor [..., K] of calibration inputs, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    flat = x.reshape(-1, x.shape[-1]).double()
    return 2 * flat.T @ flat / flat.shape[0]


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, *, group_size: int = 128,
                  act_order: bool = False, block_size: int = 128,
                  damp: float = 0.01) -> QuantizedWeight:
    """GPTQ int4 of w [N, K] (nn.Linear layout) given the Hessian h [K, K] of its inputs.

    Returns the same "int4" QuantizedWeight as `quantize(w, "int4", group_size=...)` (RTN)."""
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise ValueError(f"w must be a 2-D weight [N, K], got {getattr(w, 'shape', w)}")
    n, k = w.shape
    if not isinstance(h, torch.Tensor) or h.shape != (k, k):
        raise ValueError(f"h must be the [K, K] = [{k}, {k}] Hessian of w's inputs, got "
                         f"{getattr(h, 'shape', type(h).__name__)}")
    if group_size not in (32, 64, 128) or k % group_size:
        raise ValueError(f"group_size must be 32, 64 or 128 and divide K={k}, got {group_size}")
    if block_size % group_size:
        raise ValueError(f"block_size={block_size} must be a multiple of group_size="
                         f"{group_size} (a group's constants are read inside one block)")
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp}")
    W = w.double().clone()
    H = h.double().clone()
    dead = H.diagonal() == 0                    # features never seen: any value is free
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = k // group_size
    scale = torch.empty(n, groups, dtype=torch.float16)
    zero = torch.empty(n, groups, dtype=torch.uint8)
    if act_order:                               # static groups from the original weights
        scale, zero = int4_params(W.reshape(n, groups, group_size))
        perm = torch.argsort(H.diagonal(), descending=True)
    else:
        perm = torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)
    codes = torch.empty(n, k, dtype=torch.int32)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        err = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = int(perm[b0 + i])             # the original feature index
            g = col // group_size
            if not act_order and col % group_size == 0:   # group start: compensated weights
                scale[:, g], zero[:, g] = int4_params(W1[:, i:i + group_size])
            s, z = scale[:, g].double(), zero[:, g].double()
            q = int4_codes(W1[:, i], s, z)
            codes[:, col] = q
            e = (W1[:, i] - s * (q.double() - z)) / Hinv1[i, i]
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]        # inside the block
            err[:, i] = e
        W[:, b1:] -= err @ Hinv[b0:b1, b1:]                         # the lazy batch update
    return from_int4_codes(codes, scale, zero, w.dtype, group_size)
