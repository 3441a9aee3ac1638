"""Standard attention as Triton kernels: the paper's baseline (FA1 Algorithm 0 and Algorithm 3).

Each step is its own kernel and hands its result to the next through global memory (HBM):

    forward                          backward (P saved by the forward)
    S = sm_scale · Q Kᵀ  → HBM       dV = Pᵀ dO
    P = softmax(S)       → HBM       dP = dO Vᵀ                     → HBM
    O = P V                          dS = P ∘ (dP − rowsum(P ∘ dP)) → HBM
                                     dQ = sm_scale · dS K,  dK = sm_scale · dSᵀ Q

So S, P, dP and dS — each seq_q × seq_k per head — are written and read back: the Θ(N²)
traffic FlashAttention removes. Written as Triton kernels (not torch ops) so that
shared.iocount counts both implementations the same way. Multi-head attention only (k and v
have q's head count): it is a measuring stick, not a library kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention._args import BlockSizes, check_causal, softmax_scale
from kernels.attention.flash import check_torch_inputs
from kernels.device import new_output
from kernels.launch import flat_grid, split_program_id


@triton.jit
def bmm_kernel(A, B, C, M, N, K, alpha,
               stride_az, stride_am, stride_ak, stride_bz, stride_bk, stride_bn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[z] = alpha · A[z] @ B[z]; C contiguous (Z, M, N). Transposes are stride swaps."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    tile, z = split_program_id(tl.cdiv(M, BLOCK_M) * n_blocks)   # tiles of C fastest, then z
    offs_m = (tile // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # pointers built once and advanced by BLOCK_K per step (cheaper in the interpreter too)
    a_ptrs = A + z * stride_az + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + z * stride_bz + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start_k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - start_k),
                    other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - start_k) & (offs_n[None, :] < N),
                    other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(C + z * M * N + offs_m[:, None] * N + offs_n[None, :],
             (acc * alpha).to(C.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def softmax_kernel(S, P, seq_q, seq_k, CAUSAL: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """P = softmax(S) row by row (bottom-right causal mask); S, P contiguous (Z, Nq, Nk)."""
    row_block, z = split_program_id(tl.cdiv(seq_q, ROWS))
    offs_m = row_block * ROWS + tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_K)                           # one whole row per block
    ok = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
    off = z * seq_q * seq_k + offs_m[:, None] * seq_k + offs_n[None, :]
    s = tl.load(S + off, mask=ok, other=float("-inf")).to(tl.float32)
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + (seq_k - seq_q), s, float("-inf"))
    m = tl.max(s, 1)
    e = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])  # rows with no key: e = 0
    l = tl.sum(e, 1)
    tl.store(P + off, (e / tl.where(l == 0.0, 1.0, l)[:, None]).to(P.dtype.element_ty), mask=ok)


@triton.jit
def softmax_bwd_kernel(P, DP, DS, seq_q, seq_k, sm_scale, ROWS: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """dS = sm_scale · P ∘ (dP − rowsum(P ∘ dP)) (FA1 eq. (3)/Algorithm 3), row by row."""
    row_block, z = split_program_id(tl.cdiv(seq_q, ROWS))
    offs_m = row_block * ROWS + tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_K)
    ok = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
    off = z * seq_q * seq_k + offs_m[:, None] * seq_k + offs_n[None, :]
    p = tl.load(P + off, mask=ok, other=0.0).to(tl.float32)
    dp = tl.load(DP + off, mask=ok, other=0.0).to(tl.float32)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None]) * sm_scale
    tl.store(DS + off, ds.to(DS.dtype.element_ty), mask=ok)


def _bmm(a, b, alpha, blocks: BlockSizes):
    """alpha · (Z, M, K) @ (Z, K, N) → (Z, M, N) contiguous; a, b may be transposed views."""
    (Z, M, K), N = a.shape, b.shape[2]
    c = new_output((Z, M, N), a.dtype, a.device)
    grid = flat_grid(triton.cdiv(M, blocks.block_m) * triton.cdiv(N, blocks.block_n), Z)
    bmm_kernel[grid](a, b, c, M, N, K, alpha, *a.stride(), *b.stride(),
                     BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=64)
    return c


def _rowwise(kernel, seq_q, seq_k, z, *args, **meta):
    block_k = triton.next_power_of_2(seq_k)
    rows = max(1, min(16, 8192 // block_k))    # keep a block at ≤ 8K elements
    kernel[flat_grid(triton.cdiv(seq_q, rows), z)](*args, ROWS=rows, BLOCK_K=block_k, **meta)


class StandardAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, blocks):
        B, H, Nq, D = q.shape
        Nk = k.shape[2]
        q, k, v = (x.reshape(B * H, -1, D) for x in (q, k, v))   # (Z, N, D) contiguous
        s = _bmm(q, k.transpose(1, 2), sm_scale, blocks)            # (Z, Nq, Nk) → HBM
        p = new_output(s.shape, s.dtype, s.device)
        _rowwise(softmax_kernel, Nq, Nk, B * H, s, p, Nq, Nk, CAUSAL=causal)
        o = _bmm(p, v, 1.0, blocks)                               # (Z, Nq, D)
        ctx.save_for_backward(q, k, v, p)                         # P saved: N² per head
        ctx.sm_scale, ctx.blocks, ctx.out_shape = sm_scale, blocks, (B, H, Nq, D)
        return o.reshape(B, H, Nq, D)

    @staticmethod
    def backward(ctx, do):
        q, k, v, p = ctx.saved_tensors
        blocks, shape = ctx.blocks, ctx.out_shape
        do = do.reshape(q.shape).contiguous()
        dv = _bmm(p.transpose(1, 2), do, 1.0, blocks)             # Pᵀ dO
        dp = _bmm(do, v.transpose(1, 2), 1.0, blocks)             # dO Vᵀ → HBM
        ds = new_output(dp.shape, dp.dtype, dp.device)
        _rowwise(softmax_bwd_kernel, p.shape[1], p.shape[2], p.shape[0], p, dp, ds,
                 p.shape[1], p.shape[2], ctx.sm_scale)            # → HBM
        dq = _bmm(ds, k, 1.0, blocks)
        dk = _bmm(ds.transpose(1, 2), q, 1.0, blocks)
        kv_shape = (shape[0], shape[1], k.shape[1], shape[3])
        return dq.reshape(shape), dk.reshape(kv_shape), dv.reshape(kv_shape), None, None, None


def standard_attention(q, k, v, *, causal: bool = False, sm_scale: float | None = None,
                       block_sizes: BlockSizes | None = None) -> torch.Tensor:
    """Attention through HBM-materialised S and P (the baseline); same arguments as
    flash_attention, multi-head only."""
    shape = check_torch_inputs(q, k, v)
    if shape.group != 1:
        raise ValueError(f"k has {shape.kv_heads} heads but standard_attention needs q's "
                         f"{shape.heads} (multi-head only)")
    scale = softmax_scale(sm_scale, shape.head_dim)
    return StandardAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                   check_causal(causal), scale, block_sizes or BlockSizes())
