"""What every Triton launcher shares: grid limits, int64 offsets, flattened program ids.

- CUDA grids allow 2^31 − 1 programs on axis 0 but only 65535 on axes 1 and 2. A (query blocks,
  batch · heads) grid stops at B·H = 65535; so the launchers flatten such grids onto axis 0 and
  the kernels split the program id back (`split_program_id`), inner index fastest: consecutive
  programs then share the outer index (the same head's K/V, the same matrix), which is also the
  order that reuses L2.
- Offsets are int32 unless something makes them int64: `row * stride` overflows once a tensor
  passes 2^31 elements (softmax rows·stride, sampling B·(γ+1)·V, the attention D pre-pass).
  `offset(index, stride)` is the one place that widens.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_GRID = (2**31 - 1, 65535, 65535)


def grid(*dims: int, what: str = "grid") -> tuple[int, ...]:
    """Check a launch grid against the CUDA limits; ValueError naming the axis if it overflows."""
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must have 1 to 3 axes, got {dims}")
    for axis, (n, limit) in enumerate(zip(dims, MAX_GRID, strict=False)):
        if n > limit:
            raise ValueError(f"{what} axis {axis} has {n} programs; CUDA allows {limit}")
    return tuple(max(int(n), 1) for n in dims)


def flat_grid(inner: int, outer: int, what: str = "grid") -> tuple[int]:
    """inner × outer programs on axis 0 (split back by `split_program_id(inner)`)."""
    return grid(inner * outer, what=what)


@triton.jit
def split_program_id(n_inner):
    """(inner, outer) from a flattened axis-0 program id; outer in int64, ready for offsets."""
    pid = tl.program_id(0)
    return pid % n_inner, (pid // n_inner).to(tl.int64)


@triton.jit
def offset(index, stride):
    """index · stride in int64, whatever the widths of index and stride."""
    return index.to(tl.int64) * stride
