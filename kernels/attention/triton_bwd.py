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
kernel owns a query block and loops over key blocks. Both skip the blocks a causal mask hides
and mask only the diagonal (and, for dQ, the ragged last key block); log2(e) is folded into the
score scale as in the forward. The dK/dV kernel works on the transposed tiles Sᵀ = K Qᵀ (as
Triton's fused-attention tutorial does), so Pᵀ and dSᵀ come out of one MMA in the register
layout the next MMA takes as its left operand: no transpose of a register tile.

Why the padding needs no mask off the diagonal: masked loads give zeros, so a query row past
seq_q has q = dO = 0 and L = D = 0 and adds 0 to dK and dV; a key row past seq_k only writes
its own rows of dK and dV, which are not stored. dQ still masks the ragged key block: there a
zero key gives P = exp(−L), which overflows for a row whose scores are all very negative.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention._args import AttentionShape, BlockSizes, padded_head_dim
from kernels.attention.triton_fwd import LOG2E_K, attention_mask, key_bounds, query_program
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
    """A block of query rows and what both backward kernels need of them: q, dO, L in base 2
    and D; with their offsets and mask (the dQ kernel stores through them)."""
    q_ok = (offs_m[:, None] < seq_q) & d_ok[None, :]
    q_off = bh * seq_q * head_dim + offs_m[:, None] * head_dim + offs_d[None, :]
    q = tl.load(Q + q_off, mask=q_ok, other=0.0)
    do = tl.load(DO + q_off, mask=q_ok, other=0.0)
    lse2 = tl.load(LSE + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0.0) * LOG2E_K
    delta = tl.load(D + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0.0)
    return q_off, q_ok, q, do, lse2, delta


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, D, bh, start_m, offs_n, offs_d, d_ok, seq_q, seq_k,
               head_dim, qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """One query block into the key block's dK, dV, on transposed tiles (BLOCK_N, BLOCK_M)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    _, _, q, do, lse2, delta = _query_block(Q, DO, LSE, D, bh, offs_m, offs_d, d_ok, seq_q,
                                            head_dim)
    p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])   # Pᵀ = exp(Sᵀ − L)
    if MASKED:   # causal diagonal: key j is seen by query i iff j <= i + (seq_k − seq_q)
        p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + (seq_k - seq_q), p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


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
    qk_scale = sm_scale * LOG2E_K
    # Causal: query i sees key j iff i >= j − (seq_k − seq_q). Query blocks before q_lo see none
    # of these keys (skipped); from q_mid on, every row sees every key of the block (no mask).
    q_lo = 0
    q_mid = 0
    if CAUSAL:
        q_lo = tl.maximum(start_n - (seq_k - seq_q), 0) // BLOCK_M * BLOCK_M
        q_mid = tl.minimum(tl.maximum(tl.cdiv(start_n + BLOCK_N - 1 - (seq_k - seq_q), BLOCK_M)
                                      * BLOCK_M, q_lo), seq_q)
    # One flat loop per region over (query head of the GQA group, query block): nesting a head
    # loop around two pipelined loops spilled on sm_90 where the flat form does not.
    n_masked = tl.cdiv(q_mid - q_lo, BLOCK_M)
    for i in range(group * n_masked):
        bh = bh_kv * group + i // n_masked   # = b * heads + h, h = h_kv * group + g
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, D, bh, q_lo + i % n_masked * BLOCK_M,
                            offs_n, offs_d, d_ok, seq_q, seq_k, head_dim, qk_scale, BLOCK_M, True)
    n_full = tl.cdiv(seq_q - q_mid, BLOCK_M)
    for i in range(group * n_full):
        bh = bh_kv * group + i // n_full
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, D, bh, q_mid + i % n_full * BLOCK_M,
                            offs_n, offs_d, d_ok, seq_q, seq_k, head_dim, qk_scale, BLOCK_M,
                            False)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, K, V, kv_base, start_n, offs_m, offs_d, d_ok, seq_q,
             seq_k, head_dim, qk_scale, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
             MASKED: tl.constexpr):
    """One key block into the query block's dQ."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = (offs_n[:, None] < seq_k) & d_ok[None, :]
    kv_off = kv_base + offs_n[:, None] * head_dim + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
    v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
    p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(attention_mask(offs_m, offs_n, seq_q, seq_k, CAUSAL), p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, D, DQ,
    group, seq_q, seq_k, head_dim, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m_block, bh = query_program(tl.cdiv(seq_q, BLOCK_M), CAUSAL)
    start_m = m_block * BLOCK_M
    kv_base = (bh // group) * seq_k * head_dim
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_off, q_ok, q, do, lse2, delta = _query_block(Q, DO, LSE, D, bh, offs_m, offs_d, d_ok,
                                                   seq_q, head_dim)
    qk_scale = sm_scale * LOG2E_K
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, kv_end = key_bounds(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, K, V, kv_base, start_n, offs_m, offs_d, d_ok,
                      seq_q, seq_k, head_dim, qk_scale, BLOCK_N, CAUSAL, False)
    for start_n in range(full_end, kv_end, BLOCK_N):       # diagonal and ragged edge
        dq = _dq_step(dq, q, do, lse2, delta, K, V, kv_base, start_n, offs_m, offs_d, d_ok,
                      seq_q, seq_k, head_dim, qk_scale, BLOCK_N, CAUSAL, True)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok)


def flash_backward(q, k, v, o, lse, do, shape: AttentionShape, causal: bool, sm_scale: float,
                   dkdv_blocks: BlockSizes, dq_blocks: BlockSizes):
    """dQ, dK, dV for contiguous q, k, v, o, do and the forward's logsumexp; each kernel with
    its own tiles (the D pre-pass takes the dQ kernel's)."""
    B, H, Hkv = shape.batch, shape.heads, shape.kv_heads
    BLOCK_D = padded_head_dim(shape.head_dim)
    delta = new_output((B, H, shape.seq_q), torch.float32, q.device)
    grid_q = flat_grid(triton.cdiv(shape.seq_q, dq_blocks.block_m), B * H)
    flash_bwd_preprocess_kernel[grid_q](o, do, delta, shape.seq_q, shape.head_dim,
                                        BLOCK_M=dq_blocks.block_m, BLOCK_D=BLOCK_D,
                                        **dq_blocks.launch)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    sizes = (shape.group, shape.seq_q, shape.seq_k, shape.head_dim, sm_scale)
    for kernel, out, blocks, grid in (
            (flash_bwd_dkdv_kernel, (dk, dv), dkdv_blocks,
             flat_grid(triton.cdiv(shape.seq_k, dkdv_blocks.block_n), B * Hkv)),
            (flash_bwd_dq_kernel, (dq,), dq_blocks, grid_q)):
        kernel[grid](q, k, v, do, lse, delta, *out, *sizes, CAUSAL=causal,
                     BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_D=BLOCK_D,
                     **blocks.launch)
    return dq, dk, dv
