"""Paged decode attention in Triton: split-K (Flash-Decoding) over a paged KV cache (vLLM).

Decode has one query token per sequence, so one program per (sequence, head) gives batch · heads
programs: at batch 1 with 32 heads that is 32 programs on an H100's 132 SMs, each streaming a
whole long context alone (Flash-Decoding's motivation). Split-K cuts each sequence's keys into
`num_splits` chunks:

- Stage 1 (`paged_attention_split_kernel`), one program per (sequence, KV head, split): the
  online softmax over its chunk gives a partial (acc, m, l) per query head, with acc unscaled.
  With one split there is nothing to merge: the program writes the normalised output itself.
- Stage 2 (`paged_attention_merge_kernel`), one program per (sequence, query head): the partials
  merge by log-sum-exp, M = max_s m_s, o = Σ_s 2^(m_s − M) acc_s / Σ_s 2^(m_s − M) l_s.

GQA packing: the `group` query heads that share a KV head are the M rows of one `tl.dot`
(padded to 16, tl.dot's minimum), so each K/V tile is loaded once per group, not once per query
head: K/V traffic per query head drops by the group size (4 for Llama-3-8B: 32 / 8).

Paging: a tile of BLOCK_N tokens may span several cache blocks; each token's address is
block_tables[b, t // block_size] · block_size + t % block_size (block_size a constexpr, so a
power of two is a shift). Tokens at or past seq_len are masked on load, so the kernel never
reads them (the tests poison them).

Latency: the address of a tile's K/V depends on a load (its block-table entries), and Triton's
software pipeliner then keeps one K/V buffer (num_stages 2 to 4, Triton 3.6 and 3.9 alike: a
`ttg.local_alloc 1x64x128` and a wait for every copy at the top of the loop; 5 gives two), so
each tile cost a table round trip, then a K/V round trip, then the compute, one after another:
1.9 µs per 64-token tile on the H200 (972 µs for 512 tiles at one split). So the loop prefetches
by hand and runs unpipelined (num_stages=1): while tile i is computed, tile i+1's K/V loads are
in flight (their blocks were read one tile earlier) and tile i+2's table entries are too; in the
sm_90 SASS the table values are first read in the next iteration. No load waits inside the loop
except for data issued a whole tile of work earlier.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.device import new_output, target_sm_count
from kernels.launch import flat_grid, offset, split_program_id
from kernels.paged._args import check_splits, check_tables, paged_shape, softmax_scale
from kernels.validate import check_same_device, check_tensor

LOG2E = math.log2(math.e)
# Stage-1 programs wanted per SM: two resident programs interleave one's compute with the
# other's loads, and keep 2 × 32 KB of K/V in flight per SM (fp16, d = 128), what Little's law
# asks of an H200 (4.8 TB/s × 0.5-1 µs loaded latency / 132 SMs: 18-36 KB). At d = 128 the registers
# allow exactly two (the prefetched tile lives in them: 200-236 a thread at 4 warps, occupancy 0.125
# in `kclub compile`).
PROGRAMS_PER_SM = 2
MIN_SPLIT_TOKENS = 256   # below this a split's fixed cost (q load, two-tile prologue) dominates
MAX_SPLITS = 64
TILE_BYTES = 16 * 1024   # one K tile (BLOCK_N × BLOCK_D elements); V's is the same again


@triton.jit
def _blocks_of(TABLES, b, max_blocks, t0, end, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Physical cache blocks of tokens t0 .. t0 + BLOCK_N − 1 of sequence b (0 past `end`: only
    tokens before it read their table entry)."""
    tok = t0 + tl.arange(0, BLOCK_N)
    return tl.load(TABLES + offset(b, max_blocks) + tok // BLOCK_SIZE, mask=tok < end, other=0)


@triton.jit
def _load_tile(C, phys, t0, end, hk, s_kb, s_kt, s_kh, offs_d, d_ok,
               BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """K or V of tokens t0 .. t0 + BLOCK_N − 1 for KV head hk, from their blocks `phys`;
    zeros past `end`, where nothing is read."""
    tok = t0 + tl.arange(0, BLOCK_N)
    row = offset(phys, s_kb) + (tok % BLOCK_SIZE) * s_kt + hk * s_kh
    return tl.load(C + row[:, None] + offs_d[None, :], mask=(tok < end)[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def paged_attention_split_kernel(
    Q, KC, VC, TABLES, LENS, ACC, M, L, O,   # q (B, Hq, D); caches (NB, BS, Hkv, D); partials
    num_splits, kv_heads, group, head_dim, max_blocks, qk_scale,
    s_kb, s_kt, s_kh,                      # cache strides: block, slot, head (head_dim is 1)
    BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DIRECT: tl.constexpr,
):
    split, bh = split_program_id(num_splits)          # bh = b · kv_heads + kv head
    b = bh // kv_heads
    hk = bh % kv_heads
    seq_len = tl.load(LENS + b)
    # This split's chunk of keys, a whole number of BLOCK_N tiles.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)                    # query heads of this KV head's group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    g_ok = offs_g < group
    heads = kv_heads * group
    q_rows = b * heads + hk * group + offs_g           # rows of q (B · Hq, D)
    q = tl.load(Q + offset(q_rows, head_dim)[:, None] + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)   # (BLOCK_G, BLOCK_D), once

    # Prologue: tile 0's K/V in flight, tile 1's blocks read.
    phys = _blocks_of(TABLES, b, max_blocks, start, end, BLOCK_SIZE, BLOCK_N)
    k = _load_tile(KC, phys, start, end, hk, s_kb, s_kt, s_kh, offs_d, d_ok, BLOCK_SIZE, BLOCK_N)
    v = _load_tile(VC, phys, start, end, hk, s_kb, s_kt, s_kh, offs_d, d_ok, BLOCK_SIZE, BLOCK_N)
    phys = _blocks_of(TABLES, b, max_blocks, start + BLOCK_N, end, BLOCK_SIZE, BLOCK_N)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        # Issue the next tile's K/V (its blocks were read one tile ago) and the blocks of the
        # one after before any use of this tile, so their latency hides behind this tile's work.
        k_next = _load_tile(KC, phys, t0 + BLOCK_N, end, hk, s_kb, s_kt, s_kh, offs_d, d_ok,
                            BLOCK_SIZE, BLOCK_N)
        v_next = _load_tile(VC, phys, t0 + BLOCK_N, end, hk, s_kb, s_kt, s_kh, offs_d, d_ok,
                            BLOCK_SIZE, BLOCK_N)
        phys = _blocks_of(TABLES, b, max_blocks, t0 + 2 * BLOCK_N, end, BLOCK_SIZE, BLOCK_N)

        t_ok = (t0 + offs_n) < end
        s = tl.dot(q, tl.trans(k)) * qk_scale          # (BLOCK_G, BLOCK_N), base 2
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)                   # m_new is finite: t_ok has a true lane
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        k, v = k_next, v_next

    out_ok = g_ok[:, None] & d_ok[None, :]
    if DIRECT:   # one split: normalise here; a length-0 sequence (l = 0) gives zeros
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + offset(q_rows, head_dim)[:, None] + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=out_ok)
    else:        # partials (B · Hq, splits, ...); an empty split: m = −inf, l = 0, acc = 0
        part = offset(q_rows, num_splits) + split
        tl.store(ACC + offset(part, head_dim)[:, None] + offs_d[None, :], acc, mask=out_ok)
        tl.store(M + part, m_i, mask=g_ok)
        tl.store(L + part, l_i, mask=g_ok)


@triton.jit
def paged_attention_merge_kernel(
    ACC, M, L, O, num_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)                # b · Hq + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    part = row * num_splits + offs_s
    m = tl.load(M + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(L + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)   # every split empty: weights 0
    w = tl.exp2(m - m_max)                                 # (BLOCK_S,): 2^(m_s − M)
    acc = tl.load(ACC + (part * head_dim)[:, None] + offs_d[None, :],
                  mask=s_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    num = tl.sum(acc * w[:, None], 0)                      # Σ_s 2^(m_s − M) acc_s
    den = tl.sum(l_s * w, 0)                               # Σ_s 2^(m_s − M) l_s
    o = num / tl.where(den == 0.0, 1.0, den)               # length 0: 0 / 1 = zeros
    tl.store(O + row * head_dim + offs_d, o.to(O.dtype.element_ty), mask=offs_d < head_dim)


def default_splits(batch: int, kv_heads: int, max_len: int, sms: int | None = None) -> int:
    """Enough (sequence, KV head, split) programs for PROGRAMS_PER_SM on each of `sms` SMs
    (default: the target's), all resident at once, but no split shorter than MIN_SPLIT_TOKENS.
    max_len is the block table's reach, so the choice needs no host sync."""
    programs = batch * kv_heads
    sms = sms or target_sm_count()
    by_sms = -(-PROGRAMS_PER_SM * sms // programs)
    by_length = max(1, max_len // MIN_SPLIT_TOKENS)
    return max(1, min(by_sms, by_length, MAX_SPLITS))


def tiles(group: int, head_dim: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_N, BLOCK_D): group rows padded to tl.dot's 16; as many keys per tile as
    keep one K tile at TILE_BYTES (64 in fp16 at d ≤ 128), 16 to 64."""
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = max(16, min(64, TILE_BYTES // (block_d * element_size)))
    return block_g, block_n, block_d


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, sm_scale=None,
                    num_splits=None, check_inputs: bool = True):
    """Decode attention of one new token per sequence over a paged KV cache.

    q: (batch, heads_q, head_dim); k_cache, v_cache: (num_blocks, block_size, heads_kv,
    head_dim); block_tables: int32 (batch, max_blocks); seq_lens: int32 (batch,). Returns
    (batch, heads_q, head_dim) like q. check_inputs=False skips the value checks of the tables
    (a host sync); shapes and dtypes are always checked.
    """
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("block_tables", block_tables), ("seq_lens", seq_lens)):
        check_tensor(x, name, nonempty=False)
    check_same_device(("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                      ("block_tables", block_tables), ("seq_lens", seq_lens))
    shape = paged_shape(q, k_cache, v_cache, block_tables, seq_lens)
    check_splits(num_splits)
    if check_inputs:
        check_tables(block_tables, seq_lens, shape)
    scale = softmax_scale(sm_scale, shape.head_dim)
    if k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides and a contiguous "
                         "head_dim")
    splits = num_splits or default_splits(shape.batch, shape.kv_heads, shape.max_len)
    q, tables, lens = q.contiguous(), block_tables.contiguous(), seq_lens.contiguous()

    out = new_output(q.shape, q.dtype, q.device)
    if splits == 1:   # the stage-1 program writes `out`; the partials are not used
        acc = m = l_ = out
    else:
        rows = shape.batch * shape.heads
        acc = new_output((rows, splits, shape.head_dim), torch.float32, q.device)
        m = new_output((rows, splits), torch.float32, q.device)
        l_ = new_output((rows, splits), torch.float32, q.device)
    block_g, block_n, block_d = tiles(shape.group, shape.head_dim, q.element_size())
    paged_attention_split_kernel[flat_grid(splits, shape.batch * shape.kv_heads)](
        q, k_cache, v_cache, tables, lens, acc, m, l_, out,
        splits, shape.kv_heads, shape.group, shape.head_dim, shape.max_blocks,
        scale * LOG2E, *k_cache.stride()[:3],
        BLOCK_SIZE=shape.block_size, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        DIRECT=splits == 1, num_warps=4, num_stages=1,
    )
    if splits > 1:
        paged_attention_merge_kernel[(shape.batch * shape.heads,)](
            acc, m, l_, out, splits, shape.head_dim,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out
