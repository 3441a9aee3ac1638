"""Argument checks for quantize() and the quantized matmuls: one place, one message each.

The matmul checks read only `.shape` and `.dtype`, so torch tensors and JAX arrays share them.
"""

from __future__ import annotations

import torch

from kernels.validate import FLOAT_DTYPES, check_tensor

GROUP_SIZES = {"int4": (32, 64, 128), "nf4": (32, 64, 128, 256)}
DEFAULT_GROUP = {"int4": 128, "nf4": 64}


def check_format_args(w, fmt, group_size, formats) -> int | None:
    """Validate quantize()'s arguments; return the group size the format uses (None: per row)."""
    check_tensor(w, "w", ndim=2, dtypes=FLOAT_DTYPES)
    if not isinstance(fmt, str) or fmt not in formats:
        raise ValueError(f"fmt must be one of {formats}, got {fmt!r}")
    if not torch.isfinite(w).all():
        raise ValueError("w has NaN or infinite values: no scale can represent them")
    if fmt not in GROUP_SIZES:
        if group_size is not None:
            raise ValueError(f"group_size is for int4 and nf4; {fmt!r} has one scale per "
                             f"output channel, got group_size={group_size}")
        return None
    g = DEFAULT_GROUP[fmt] if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g not in GROUP_SIZES[fmt]:
        raise ValueError(f"group_size for {fmt} must be one of {GROUP_SIZES[fmt]}, got "
                         f"{group_size!r}")
    k = w.shape[1]
    if k % g:
        raise ValueError(f"group_size={g} must divide K={k} (w is [N, K] = {tuple(w.shape)})")
    return g


def check_matmul_args(x, qw, fmts, dtypes=FLOAT_DTYPES) -> tuple[int, int, int]:
    """x [M, K] against a QuantizedWeight of shape (N, K); returns (M, K, N)."""
    from kernels.quant.formats import QuantizedWeight

    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight (from quantize), got {type(qw).__name__}")
    if qw.fmt not in fmts:
        raise ValueError(f"qw.fmt must be one of {fmts} here, got {qw.fmt!r}")
    if len(x.shape) != 2:
        raise ValueError(f"x must have 2 dimensions [M, K], got shape {tuple(x.shape)}")
    n, k = qw.shape
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but qw was quantized from a [N, K] = "
                         f"{qw.shape} weight")
    if x.shape[0] == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    names = [str(d).replace("torch.", "") for d in dtypes]
    if str(x.dtype).replace("torch.", "") not in names:
        raise TypeError(f"x must have dtype in ({', '.join(names)}), got {x.dtype}")
    return x.shape[0], k, n
