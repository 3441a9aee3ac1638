"""The specification of the paged kernels, written for clarity (torch; float64 in the tests).

- Paged attention (vLLM, Kwon et al. 2023, §4.1): the K/V of sequence b's token t sit in
  physical block `block_tables[b, t // block_size]`, slot `t % block_size`. The reference gathers
  them token by token through the table, then runs plain softmax attention for the one new query.
- RoPE (RoFormer, Su et al. 2021, eq. 34): pair i of a head is rotated by the angle
  position · θ^(−2i/d). Pairs are (2i, 2i+1) in the paper's *interleaved* layout and (i, i + d/2)
  in Llama/HF's *half-split* layout; the two differ only by a permutation of the head dim.
"""

from __future__ import annotations

import torch

from kernels.paged._args import (
    REFERENCE_FLOATS,
    check_tables,
    paged_shape,
    rope_shape,
    softmax_scale,
)


def paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, *, sm_scale=None):
    """q: (B, Hq, D); caches: (num_blocks, block_size, Hkv, D); block_tables: int32 (B, max_blocks);
    seq_lens: int32 (B,). Returns (B, Hq, D) in q's dtype; a sequence of length 0 gives zeros."""
    shape = paged_shape(q, k_cache, v_cache, block_tables, seq_lens, REFERENCE_FLOATS)
    check_tables(block_tables, seq_lens, shape)
    scale = softmax_scale(sm_scale, shape.head_dim)
    out = torch.zeros_like(q)
    for b in range(shape.batch):
        tokens = range(int(seq_lens[b]))
        if not tokens:
            continue
        blocks = [int(block_tables[b, t // shape.block_size]) for t in tokens]
        slots = [t % shape.block_size for t in tokens]
        k = k_cache[blocks, slots]                                  # (n, Hkv, D)
        v = v_cache[blocks, slots]
        k = k.repeat_interleave(shape.group, dim=1)                 # GQA: head h reads h // g
        v = v.repeat_interleave(shape.group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b], k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v)
    return out


def rope_angles(positions, head_dim: int, theta: float, dtype=torch.float64):
    """(tokens, head_dim / 2): position · θ^(−2i/d), computed in `dtype`."""
    i = torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device)
    inv_freq = theta ** (-i / head_dim)
    return positions.to(dtype)[:, None] * inv_freq[None, :]


def rope_pairs(head_dim: int, interleaved: bool) -> tuple[slice, slice]:
    """The two members of each rotary pair along the head dim."""
    if interleaved:
        return slice(0, head_dim, 2), slice(1, head_dim, 2)
    return slice(0, head_dim // 2), slice(head_dim // 2, head_dim)


def rope_reference(x, positions, *, theta: float = 10000.0, interleaved: bool = False):
    """x: (tokens, heads, head_dim); positions: (tokens,). Rotate each pair (x1, x2) to
    (x1 cos − x2 sin, x2 cos + x1 sin); differentiable through torch autograd. The angle is
    computed in float64 (the kernels use fp32: see rope_triton.py)."""
    _, _, head_dim = rope_shape(x, positions, theta, interleaved, REFERENCE_FLOATS)
    angles = rope_angles(positions, head_dim, float(theta))[:, None, :]   # (T, 1, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = rope_pairs(head_dim, interleaved)
    x1, x2 = x[..., first], x[..., second]
    out = torch.empty_like(x)
    out[..., first] = x1 * cos - x2 * sin
    out[..., second] = x2 * cos + x1 * sin
    return out


def rope_cache_write_reference(q, k, v, positions, slot_mapping, k_cache, v_cache, *,
                               theta: float = 10000.0, interleaved: bool = False):
    """The unfused sequence the fused kernel replaces: rope(q), rope(k), then k and v written to
    their slots (slot = block · block_size + offset; −1 skips the token). Returns q rotated;
    k_cache and v_cache are updated in place."""
    q_rot = rope_reference(q, positions, theta=theta, interleaved=interleaved)
    k_rot = rope_reference(k, positions, theta=theta, interleaved=interleaved)
    keep = slot_mapping >= 0
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k[slot_mapping[keep].long()] = k_rot[keep]
    flat_v[slot_mapping[keep].long()] = v[keep]
    return q_rot


def random_paged_inputs(lengths, heads: int, kv_heads: int, head_dim: int, dtype, *,
                        pool: int = 400, block_size: int = 16, seed: int = 0, device="cpu"):
    """Inputs for the checks: (q, k_cache, v_cache, block_tables, seq_lens). Each sequence's
    blocks are drawn at random (distinct) from a pool of `pool` blocks, and every cache slot no
    sequence owns is NaN, so a kernel that reads past a sequence's end shows it."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    max_blocks = max(1, max(-(-n // block_size) for n in lengths))
    if batch * max_blocks > pool:
        raise ValueError(f"pool={pool} blocks cannot hold {batch} × {max_blocks} blocks")
    q = torch.randn(batch, heads, head_dim, generator=g)
    k = torch.full((pool, block_size, kv_heads, head_dim), float("nan"))
    v = k.clone()
    chosen = torch.randperm(pool, generator=g)[:batch * max_blocks].view(batch, max_blocks)
    for b, n in enumerate(lengths):
        blocks, slots = chosen[b, torch.arange(n) // block_size], torch.arange(n) % block_size
        k[blocks, slots] = torch.randn(n, kv_heads, head_dim, generator=g)
        v[blocks, slots] = torch.randn(n, kv_heads, head_dim, generator=g)
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
            chosen.to(device, torch.int32), torch.tensor(lengths, dtype=torch.int32,
                                                         device=device))
