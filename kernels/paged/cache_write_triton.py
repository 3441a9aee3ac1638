"""RoPE fused with the paged-cache write: one kernel instead of three (vLLM's
`rotary_embedding` + `reshape_and_cache`, merged).

Unfused, a decode or prefill step runs rope(q), rope(k), then copies k and v into their slots:
k is written rotated by the second kernel and read back by the third. Fused, each program loads
its tokens' q, k and v once, rotates q and k in registers, and stores q rotated and k, v straight
into the cache. Saved: one write and one read of k (2 · tokens · heads_kv · head_dim elements)
and two launches; the lab counts both sides with shared.iocount.

slot_mapping[t] = physical block · block_size + offset of token t; −1 skips the token (padding,
as in vLLM).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.device import new_output
from kernels.launch import offset
from kernels.paged._args import rope_shape
from kernels.paged.rope_triton import (
    check_rope,
    launch_rope,
    rope,
    rope_rotate,
    rope_tile,
)
from kernels.validate import check_same_device, check_tensor


@triton.jit
def rope_cache_write_kernel(
    Q, K, V, POS, SLOT, QO, KC, VC,   # q, qo (T, Hq, D); k, v (T, Hkv, D); caches (NB·BS, Hkv, D)
    tokens, heads_q, heads_kv, half, log2_theta,
    INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    h, offs_t, t_ok, ok, cos, sin, c1, c2 = rope_tile(      # query head h of BLOCK_T tokens
        POS, tokens, half, log2_theta, INTERLEAVED, BLOCK_T, BLOCK_P)
    q_rows = offset(offs_t * heads_q + h, 2 * half)
    rope_rotate(Q, QO, q_rows, q_rows, c1, c2, ok, cos, sin)
    if h < heads_kv:   # the first heads_kv programs of a token block also own K/V head h
        slot = tl.load(SLOT + offs_t, mask=t_ok, other=-1)
        kv_ok = ok & (slot >= 0)[:, None]
        kv_rows = offset(offs_t * heads_kv + h, 2 * half)
        c_rows = offset(slot * heads_kv + h, 2 * half)
        rope_rotate(K, KC, kv_rows, c_rows, c1, c2, kv_ok, cos, sin)
        # v is not rotated: both halves of each pair are copied into the slot as they are
        v1 = tl.load(V + kv_rows[:, None] + c1[None, :], mask=kv_ok, other=0.0)
        tl.store(VC + c_rows[:, None] + c1[None, :], v1, mask=kv_ok)
        v2 = tl.load(V + kv_rows[:, None] + c2[None, :], mask=kv_ok, other=0.0)
        tl.store(VC + c_rows[:, None] + c2[None, :], v2, mask=kv_ok)


@triton.jit
def cache_write_kernel(K, V, SLOT, KC, VC, width, BLOCK_W: tl.constexpr):
    """The unfused write (vLLM's reshape_and_cache): one token's heads_kv · head_dim row per
    program, in BLOCK_W chunks."""
    t = tl.program_id(0)
    slot = tl.load(SLOT + t)
    if slot >= 0:
        for w0 in range(0, width, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            ok = offs_w < width
            src = offset(t, width) + offs_w
            dst = offset(slot, width) + offs_w
            tl.store(KC + dst, tl.load(K + src, mask=ok), mask=ok)
            tl.store(VC + dst, tl.load(V + src, mask=ok), mask=ok)


def _check(q, k, v, positions, slot_mapping, k_cache, v_cache, theta, interleaved):
    check_rope(q, positions, theta, interleaved)
    tokens, heads_q, head_dim = q.shape
    for name, x in (("k", k), ("v", v), ("slot_mapping", slot_mapping), ("k_cache", k_cache),
                    ("v_cache", v_cache)):
        check_tensor(x, name, nonempty=False)
    check_same_device(("q", q), ("k", k), ("v", v), ("slot_mapping", slot_mapping),
                      ("k_cache", k_cache), ("v_cache", v_cache))
    rope_shape(k, positions, theta, interleaved)
    if tuple(v.shape) != tuple(k.shape) or k.shape[2] != head_dim or heads_q % k.shape[1]:
        raise ValueError(f"k and v must be (tokens, heads_kv | {heads_q}, {head_dim}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.ndim != 4 or tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
        raise ValueError(f"k_cache must be (num_blocks, block_size, {k.shape[1]}, {head_dim}), "
                         f"got {tuple(k_cache.shape)}")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}")
    for name, x in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has dtype {q.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous: the kernels write them in place")
    if slot_mapping.dtype not in (torch.int32, torch.int64) or tuple(slot_mapping.shape) != (
            tokens,):
        raise ValueError(f"slot_mapping must be int32/int64 of shape ({tokens},), got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    slots = k_cache.shape[0] * k_cache.shape[1]
    if tokens and (slot_mapping.min() < -1 or slot_mapping.max() >= slots):
        raise ValueError(f"slot_mapping must lie in −1..{slots - 1}")


def rope_cache_write(q, k, v, positions, slot_mapping, k_cache, v_cache, *,
                     theta: float = 10000.0, interleaved: bool = False) -> torch.Tensor:
    """Rotate q and k at `positions`; write k (rotated) and v into k_cache/v_cache at
    `slot_mapping` (in place); return q rotated. q: (T, Hq, D); k, v: (T, Hkv, D)."""
    _check(q, k, v, positions, slot_mapping, k_cache, v_cache, theta, interleaved)
    tokens, heads_q, head_dim = q.shape
    q_out = new_output(q.shape, q.dtype, q.device)
    if tokens == 0:
        return q_out
    half = head_dim // 2
    launch_rope(rope_cache_write_kernel, tokens, heads_q, half, q.contiguous(), k.contiguous(),
                v.contiguous(), positions.contiguous(), slot_mapping.contiguous(), q_out, k_cache,
                v_cache, tokens, heads_q, k.shape[1], half, math.log2(theta),
                INTERLEAVED=interleaved)
    return q_out


def cache_write(k, v, slot_mapping, k_cache, v_cache) -> None:
    """Copy k, v (T, Hkv, D) into their slots of the caches, in place (no rotation)."""
    tokens = k.shape[0]
    if tokens == 0:
        return
    width = k.shape[1] * k.shape[2]
    cache_write_kernel[(tokens,)](
        k.contiguous(), v.contiguous(), slot_mapping.contiguous(), k_cache, v_cache, width,
        BLOCK_W=min(1024, triton.next_power_of_2(width)), num_warps=4)


def rope_cache_write_unfused(q, k, v, positions, slot_mapping, k_cache, v_cache, *,
                             theta: float = 10000.0, interleaved: bool = False) -> torch.Tensor:
    """The three-kernel baseline the fused kernel is counted against: rope, rope, cache_write."""
    _check(q, k, v, positions, slot_mapping, k_cache, v_cache, theta, interleaved)
    q_out = rope(q, positions, theta=theta, interleaved=interleaved)
    k_rot = rope(k, positions, theta=theta, interleaved=interleaved)
    cache_write(k_rot, v, slot_mapping, k_cache, v_cache)
    return q_out
