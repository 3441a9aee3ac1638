"""FlashAttention-2 backward in Triton (FA2 §3.1.2 and Algorithm 2; FA1 Appendix B.2).

Nothing of size seq_q × seq_k was saved by the forward, only O and the logsumexp L. The
backward recomputes each block of S = sm_scale · Q Kᵀ from Q and K and gets P = exp(S − L)
directly (no max or sum needed: L already holds them). That costs one more QKᵀ per pass but
saves reading an N² matrix from HBM, which is the slower of the two (FA1 §3.1, "recomputation").

With dO the output gradient, per block:
    dV += Pᵀ dO            dP = dO Vᵀ
    dS = P ∘ (dP − D)      with D = rowsum(dO ∘ O)  (FA2 eq. for dS; the pre-pass below)
    dK += sm_scale · dSᵀ Q  dQ += sm_scale · dS K
D replaces rowsum(P ∘ dP), which would need a whole row of P, by a rowsum over head_dim.

Two passes, no atomics: the dK/dV kernel owns a key block and loops over query blocks (and over
the query heads of its GQA group, so dK and dV are summed over the group in registers); the dQ
kernel owns a query block and loops over key blocks. Both skip the blocks a causal mask hides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention._args import AttentionShape, BlockSizes, padded_head_dim
from kernels.attention.triton_fwd import LOG2E_K, attention_mask, causal_kv_end
from kernels.device import new_output
from kernels.launch import flat_grid, split_program_id


@triton.jit
def flash_bwd_preprocess_kernel(O, DO, D, seq_q, head_dim,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """D = rowsum(dO ∘ O): (B·H, Nq), fp32. O and dO contiguous (B·H, Nq, head_dim)."""
    m_block, bh = split_program_id(tl.cdiv(seq_q, BLOCK_M))
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    rows = bh * seq_q * head_dim + offs_m[:, None] * head_dim + offs_d[None, :]
    o = tl.load(O + rows, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(D + bh * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


@triton.jit
def _query_block(Q, DO, LSE, D, bh, offs_m, offs_d, d_ok, seq_q, head_dim):
    """A block of query rows and what both backward kernels need of them: q, dO, the
    logsumexp L and D; with their offsets and mask (the dQ kernel stores through them)."""
    q_ok = (offs_m[:, None] < seq_q) & d_ok[None, :]
    q_off = bh * seq_q * head_dim + offs_m[:, None] * head_dim + offs_d[None, :]
    q = tl.load(Q + q_off, mask=q_ok, other=0.0)
    do = tl.load(DO + q_off, mask=q_ok, other=0.0)
    lse = tl.load(LSE + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0.0)
    delta = tl.load(D + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0.0)
    return q_off, q_ok, q, do, lse, delta


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, D, DK, DV,  # q, do: (B, H, Nq, D); k, v, dk, dv: (B, Hkv, Nk, D)
    group, seq_q, seq_k, head_dim, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n_block, bh_kv = split_program_id(tl.cdiv(seq_k, BLOCK_N))   # bh_kv = b · kv_heads + h_kv
    start_n = n_block * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_ok = (offs_n[:, None] < seq_k) & d_ok[None, :]
    kv_off = bh_kv * seq_k * head_dim + offs_n[:, None] * head_dim + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_ok, other=0.0)          # (BLOCK_N, BLOCK_D), read once
    v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Causal: query i sees key j iff i >= j − (seq_k − seq_q); earlier query blocks are skipped.
    q_start = 0
    if CAUSAL:
        q_start = (tl.maximum(start_n - (seq_k - seq_q), 0) // BLOCK_M) * BLOCK_M
    for g in range(group):                   # the query heads that share this K/V head
        bh = bh_kv * group + g               # = b * heads + h, h = h_kv * group + g
        for start_m in range(q_start, seq_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            _, _, q, do, lse, delta = _query_block(Q, DO, LSE, D, bh, offs_m, offs_d, d_ok,
                                                   seq_q, head_dim)
            s = tl.dot(q, tl.trans(k)) * (sm_scale * LOG2E_K)    # base 2
            p = tl.exp2(s - lse[:, None] * LOG2E_K)              # P = exp(S − L)
            p = tl.where(attention_mask(offs_m, offs_n, seq_q, seq_k, CAUSAL), p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, D, DQ,
    group, seq_q, seq_k, head_dim, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m_block, bh = split_program_id(tl.cdiv(seq_q, BLOCK_M))
    start_m = m_block * BLOCK_M
    bh_kv = bh // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_off, q_ok, q, do, lse, delta = _query_block(Q, DO, LSE, D, bh, offs_m, offs_d, d_ok,
                                                  seq_q, head_dim)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, causal_kv_end(start_m, seq_q, seq_k, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < seq_k) & d_ok[None, :]
        kv_off = bh_kv * seq_k * head_dim + offs_n[:, None] * head_dim + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * (sm_scale * LOG2E_K)
        p = tl.exp2(s - lse[:, None] * LOG2E_K)
        p = tl.where(attention_mask(offs_m, offs_n, seq_q, seq_k, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok)


def flash_backward(q, k, v, o, lse, do, shape: AttentionShape, causal: bool, sm_scale: float,
                   blocks: BlockSizes):
    """dQ, dK, dV for contiguous q, k, v, o, do and the forward's logsumexp."""
    B, H, Hkv = shape.batch, shape.heads, shape.kv_heads
    BLOCK_D = padded_head_dim(shape.head_dim)
    delta = new_output((B, H, shape.seq_q), torch.float32, q.device)
    grid_q = flat_grid(triton.cdiv(shape.seq_q, blocks.block_m), B * H)
    flash_bwd_preprocess_kernel[grid_q](o, do, delta, shape.seq_q, shape.head_dim,
                                        BLOCK_M=blocks.block_m, BLOCK_D=BLOCK_D,
                                        **blocks.launch)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    common = dict(CAUSAL=causal, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_D=BLOCK_D,
                  **blocks.launch)
    sizes = (shape.group, shape.seq_q, shape.seq_k, shape.head_dim, sm_scale)
    flash_bwd_dkdv_kernel[flat_grid(triton.cdiv(shape.seq_k, blocks.block_n), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, *sizes, **common)
    flash_bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, *sizes, **common)
    return dq, dk, dv
