"""Argument checks shared by the Triton, Pallas and reference paged kernels: one place, one message.

Shapes and dtypes are read through `.shape` and `.dtype` only, so torch tensors and JAX arrays go
through the same checks; the torch-only ones (type, device) come from kernels.validate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.attention._args import softmax_scale  # noqa: F401  (one rule for every attention)

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
FLOAT_NAMES = ("float32", "float16", "bfloat16")
REFERENCE_FLOATS = (*FLOAT_NAMES, "float64")   # the references also run as the float64 truth


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PagedShape:
    """q: (batch, heads, head_dim); caches: (num_blocks, block_size, kv_heads, head_dim);
    block_tables: (batch, max_blocks)."""

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks: int

    @property
    def group(self) -> int:
        """Query heads per K/V head: 1 is MHA, `heads` is MQA, in between GQA."""
        return self.heads // self.kv_heads

    @property
    def max_len(self) -> int:
        """The longest sequence the block table can address."""
        return self.max_blocks * self.block_size


def _float(x, name: str, floats=FLOAT_NAMES) -> None:
    if _name(x.dtype) not in floats:
        raise TypeError(f"{name} must have dtype in ({', '.join(floats)}), got {x.dtype}")


def _int32(x, name: str) -> None:
    if _name(x.dtype) != "int32":
        raise TypeError(f"{name} must have dtype int32, got {x.dtype}")


def _rank(x, name: str, ndim: int, what: str) -> None:
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {what}, got shape {tuple(x.shape)}")


def paged_shape(q, k_cache, v_cache, block_tables, seq_lens, floats=FLOAT_NAMES) -> PagedShape:
    """Validate shapes and dtypes (ValueError/TypeError naming the argument); return them."""
    _rank(q, "q", 3, "(batch, heads, head_dim)")
    _rank(k_cache, "k_cache", 4, "(num_blocks, block_size, kv_heads, head_dim)")
    _rank(block_tables, "block_tables", 2, "(batch, max_blocks)")
    _rank(seq_lens, "seq_lens", 1, "(batch,)")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    _float(q, "q", floats)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has dtype {q.dtype}")
    _int32(block_tables, "block_tables")
    _int32(seq_lens, "seq_lens")
    batch, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, kv_dim = k_cache.shape
    if 0 in (batch, heads, num_blocks, block_size, kv_heads):
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} must not be "
                         "empty")
    if kv_dim != head_dim:
        raise ValueError(f"k_cache has head_dim {kv_dim} but q has head_dim {head_dim}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {head_dim}, expected {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if heads % kv_heads:
        raise ValueError(f"k_cache has {kv_heads} heads, which must divide q's {heads} heads")
    if tuple(block_tables.shape)[0] != batch or block_tables.shape[1] == 0:
        raise ValueError(f"block_tables must be ({batch}, max_blocks ≥ 1), got "
                         f"{tuple(block_tables.shape)}")
    if tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"seq_lens must have shape ({batch},), got {tuple(seq_lens.shape)}")
    return PagedShape(batch, heads, kv_heads, head_dim, num_blocks, block_size,
                      block_tables.shape[1])


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def check_tables(block_tables, seq_lens, shape: PagedShape) -> None:
    """The values: 0 ≤ seq_len ≤ max_blocks · block_size, and every block a sequence uses is a
    block of the cache. Reads both to the host (a sync on a GPU): the launchers let callers that
    built the tables themselves (the block manager) skip it with check_inputs=False."""
    lens, tables = _numpy(seq_lens), _numpy(block_tables)
    if (lens < 0).any() or (lens > shape.max_len).any():
        raise ValueError(f"seq_lens must lie in 0..{shape.max_len} (max_blocks × block_size), "
                         f"got {lens.min()}..{lens.max()}")
    used = np.arange(shape.max_blocks)[None, :] < -(-lens[:, None] // shape.block_size)
    bad = used & ((tables < 0) | (tables >= shape.num_blocks))
    if bad.any():
        b, j = np.argwhere(bad)[0]
        raise ValueError(f"block_tables[{b}, {j}] = {tables[b, j]} is not a block of the cache "
                         f"(0..{shape.num_blocks - 1})")


def check_splits(num_splits) -> None:
    if num_splits is None:
        return
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")


def rope_shape(x, positions, theta, interleaved, floats=FLOAT_NAMES) -> tuple[int, int, int]:
    """x: (tokens, heads, head_dim) float, head_dim even; positions: (tokens,) integer."""
    _rank(x, "x", 3, "(tokens, heads, head_dim)")
    _float(x, "x", floats)
    _rank(positions, "positions", 1, "(tokens,)")
    if "int" not in _name(positions.dtype):
        raise TypeError(f"positions must have an integer dtype, got {positions.dtype}")
    tokens, heads, head_dim = x.shape
    if positions.shape[0] != tokens:
        raise ValueError(f"positions must have shape ({tokens},), got {tuple(positions.shape)}")
    if head_dim % 2 or head_dim == 0:
        raise ValueError(f"x has head_dim {head_dim}; rotary pairs need an even head_dim")
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta > 1:
        raise ValueError(f"theta must be a float > 1, got {theta!r}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    return tokens, heads, head_dim
