"""Argument checks shared by the Triton, Pallas and reference attention: one place, one message.

Works on torch tensors and JAX arrays alike (only `.shape` and `.dtype` are read here); the
torch-specific checks (type, device) live in kernels.validate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


@dataclass(frozen=True)
class AttentionShape:
    """q: (batch, heads, seq_q, head_dim); k, v: (batch, kv_heads, seq_k, head_dim)."""

    batch: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_k: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head: 1 is MHA, `heads` is MQA, in between GQA."""
        return self.heads // self.kv_heads


def attention_shape(q, k, v) -> AttentionShape:
    """Validate the shapes of q, k, v (ValueError naming the argument) and return them."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, seq, head_dim), "
                             f"got shape {tuple(x.shape)}")
        if any(n == 0 for n in x.shape):
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    batch, heads, seq_q, head_dim = q.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    kv_batch, kv_heads, seq_k, kv_dim = k.shape
    if kv_batch != batch:
        raise ValueError(f"k has batch {kv_batch} but q has batch {batch}")
    if kv_dim != head_dim:
        raise ValueError(f"k has head_dim {kv_dim} but q has head_dim {head_dim}")
    if heads % kv_heads:
        raise ValueError(f"k has {kv_heads} heads, which must divide q's {heads} heads "
                         "(multi-query / grouped-query attention)")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {head_dim}, expected {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    return AttentionShape(batch, heads, kv_heads, seq_q, seq_k, head_dim)


def check_same_dtype(q, k, v) -> None:
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has dtype {q.dtype}")


def softmax_scale(sm_scale, head_dim: int) -> float:
    """The factor on QK^T: 1/sqrt(head_dim) unless given (FA1 §2.1, tau)."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, int | float):
        raise TypeError(f"sm_scale must be a float or None, got {type(sm_scale).__name__}")
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a finite positive float, got {sm_scale}")
    return float(sm_scale)


def check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return causal


@dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: block_m rows of Q (Br in FA1), block_n rows of K/V (Bc) per step; and, for
    the Triton kernels on a GPU, the warps per program and the software-pipeline depth.

    Powers of two >= 16 (tl.dot needs K >= 16 for 16-bit inputs; GPU block shapes are powers
    of two). Given by the caller, the same tiles serve the forward and both backward kernels;
    left out, each pass gets its own per-GPU config (kernels/attention/configs.py).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or not (
                1 <= self.num_stages <= 8):
            raise ValueError(f"num_stages must be an int in 1..8, got {self.num_stages!r}")

    @property
    def launch(self) -> dict:
        """The Triton launch options: `kernel[grid](..., **blocks.launch)`."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def padded_head_dim(head_dim: int) -> int:
    """The head-dim block: next power of two (masks cover the padding), e.g. 40 -> 64."""
    return max(16, 1 << (head_dim - 1).bit_length())
