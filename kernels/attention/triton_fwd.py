"""FlashAttention forward in Triton (FA1 Algorithm 1, with FA2's loop order, §3.1).

One program owns one block of block_m query rows of one head and streams every visible
block of keys/values past it, so Q is read once and O written once; K and V are read once
per query block. S and P live only in registers/SRAM, never in global memory.

The online softmax (FA2 §3.1.1) keeps per row the running max m and the running sum l of
exp(s − m), and an *unscaled* accumulator acc = Σ exp(s − m) v. When a new block raises the
max to m', the old state is rescaled by exp(m − m'); the division by l happens once, at the
end. The kernel works in base 2 (exp2 is the fast instruction on a GPU): log2(e) is folded into
the score scale, so a score costs one FMA (s · scale − m) and one exp2. The saved logsumexp
L = m + log(l) (natural log) is what the backward needs to recompute P = exp(S − L) without a
second softmax pass (FA2 §3.1.2).

Key blocks come in two loops (FA2 §3.1, causal masking; Triton's fused-attention tutorial does
the same): first the blocks every row of the query block sees whole, with no mask at all; then
the few that need one, the causal diagonal and the ragged last block. Without the split every
block paid a (block_m × block_n) compare-and-select and a -inf guard per row.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.attention._args import AttentionShape, BlockSizes, padded_head_dim
from kernels.device import new_output
from kernels.launch import flat_grid, split_program_id

LOG2E = math.log2(math.e)
LN2 = tl.constexpr(math.log(2.0))
LOG2E_K = tl.constexpr(LOG2E)   # the same constant, usable inside kernels


@triton.jit
def key_bounds(start_m, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """(full_end, kv_end) for a query block: key blocks before full_end exist whole and every
    row sees them (no mask); [full_end, kv_end) need the mask; blocks past kv_end are hidden
    by the causal mask and skipped."""
    if CAUSAL:
        # bottom-right alignment: query i sees key j iff j <= i + (seq_k - seq_q)
        kv_end = tl.maximum(tl.minimum(seq_k, start_m + BLOCK_M + seq_k - seq_q), 0)
        seen_by_all = tl.maximum(tl.minimum(seq_k, start_m + seq_k - seq_q + 1), 0)
    else:
        kv_end = seq_k
        seen_by_all = seq_k
    return seen_by_all // BLOCK_N * BLOCK_N, kv_end


@triton.jit
def query_program(n_blocks, CAUSAL: tl.constexpr):
    """(query block, b · heads + h) of this program. Causal, the last query blocks see the most
    keys: launch them first (as FA2 does), so the grid's last wave holds short programs."""
    m_block, bh = split_program_id(n_blocks)
    if CAUSAL:
        m_block = n_blocks - 1 - m_block
    return m_block, bh


@triton.jit
def attention_mask(offs_m, offs_n, seq_q, seq_k, CAUSAL: tl.constexpr):
    """(block_m, block_n) bool: the pair (query i, key j) exists and is visible."""
    valid = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (seq_k - seq_q))
    return valid


@triton.jit
def _fwd_step(acc, l_i, m_i, q, K, V, kv_base, start_n, offs_m, offs_n, offs_d, d_ok,
              seq_q, seq_k, head_dim, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """One key block into the running (acc, l, m) of the query block."""
    cols = start_n + offs_n
    kv_ok = (cols[:, None] < seq_k) & d_ok[None, :]
    kv_off = kv_base + cols[:, None] * head_dim + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_ok, other=0.0)          # (BLOCK_N, BLOCK_D)
    s = tl.dot(q, tl.trans(k))                               # (BLOCK_M, BLOCK_N), unscaled
    if MASKED:
        s = tl.where(attention_mask(offs_m, cols, seq_q, seq_k, CAUSAL), s * qk_scale,
                     float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
    else:
        # every score is finite here, so m_new is too; scale > 0 commutes with the max
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_shift = m_new
        p = tl.exp2(s * qk_scale - m_new[:, None])           # one FMA and one exp2 per score
    alpha = tl.exp2(m_i - m_shift)                           # rescale of the old state
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])     # accumulate in the MMA
    return acc, l_i, m_new


@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE,  # q, o: (B, H, Nq, D); k, v: (B, Hkv, Nk, D); lse: (B, H, Nq) fp32
    group, seq_q, seq_k, head_dim, qk_scale,    # qk_scale = sm_scale · log2(e)
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one flat grid axis: query block fastest, then b · heads + h (int64: offsets pass 2^31)
    m_block, bh = query_program(tl.cdiv(seq_q, BLOCK_M), CAUSAL)
    start_m = m_block * BLOCK_M
    bh_kv = bh // group                  # GQA: the K/V head h // group (group | heads)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)         # head_dim padded to a power of two, masked
    d_ok = offs_d < head_dim
    q_ok = (offs_m[:, None] < seq_q) & d_ok[None, :]
    q_off = bh * seq_q * head_dim + offs_m[:, None] * head_dim + offs_d[None, :]
    q = tl.load(Q + q_off, mask=q_ok, other=0.0)            # (BLOCK_M, BLOCK_D), read once
    kv_base = bh_kv * seq_k * head_dim

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)     # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)                   # running Σ exp2(s − m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)          # unscaled Σ exp2(s − m) v
    full_end, kv_end = key_bounds(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    # Rows past seq_q need no mask: their q is 0, their scores finite, and they are not stored.
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, kv_base, start_n, offs_m, offs_n,
                                  offs_d, d_ok, seq_q, seq_k, head_dim, qk_scale, CAUSAL, False)
    for start_n in range(full_end, kv_end, BLOCK_N):       # diagonal and ragged edge
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, kv_base, start_n, offs_m, offs_n,
                                  offs_d, d_ok, seq_q, seq_k, head_dim, qk_scale, CAUSAL, True)

    # Rows that saw no key (causal, seq_q > seq_k) output 0 and get L = +inf, so the backward's
    # exp(S − L) is 0 for them too.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + q_off, o.to(O.dtype.element_ty), mask=q_ok)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(LSE + bh * seq_q + offs_m, lse, mask=offs_m < seq_q)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape,
                  causal: bool, sm_scale: float, blocks: BlockSizes):
    """Launch the forward kernel; return O (like q) and the logsumexp L (B, H, Nq) in fp32.

    Inputs must be contiguous (the autograd wrapper makes them so).
    """
    o = new_output(q.shape, q.dtype, q.device)
    lse = new_output((shape.batch, shape.heads, shape.seq_q), torch.float32, q.device)
    grid = flat_grid(triton.cdiv(shape.seq_q, blocks.block_m), shape.batch * shape.heads)
    flash_fwd_kernel[grid](
        q, k, v, o, lse,
        shape.group, shape.seq_q, shape.seq_k, shape.head_dim, sm_scale * LOG2E,
        CAUSAL=causal, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        BLOCK_D=padded_head_dim(shape.head_dim), **blocks.launch,
    )
    return o, lse
