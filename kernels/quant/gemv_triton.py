"""The decode kernel for one or two rows of x: split-K, multiply-reduce on the CUDA cores.

At M = 1 the matmul is a matrix-vector product, and weight-only quantization pays only if the
kernel streams the packed weight at close to HBM bandwidth. What that takes:

- Enough programs. One 4-warp program per 512 columns is 22 programs at N = 11008, for an
  H100's 132 SMs. So K is split too (`matmul_triton.split_plan`, 22 slices there): each program
  reduces a slice of K for its columns and stores a partial [M, BLOCK_N]; a second, small
  launch sums the partials in a fixed order and applies the epilogue (vLLM's Triton AWQ GEMM
  and GEMV write per-split partials and sum them the same way; the partials, M·N·4 bytes a
  split, are written and read back: 4% of the int4 weight's bytes here, mostly in L2).
- Wide loads. A step loads a [BLOCK_K/8, BLOCK_N] tile of int32 words (int4, nf4) or a
  [BLOCK_K, BLOCK_N] tile of bytes (int8), N contiguous: each thread reads 16 bytes at once,
  a warp 512 consecutive bytes. BLOCK_N = 128 × num_warps gives every thread exactly one
  16-byte vector per row, the layout Triton picks for the per-column constants too; any other
  width made it convert the weight tile's layout through shared memory every step.
- No tensor cores. tl.dot needs a 16-row tile: at M = 1 it would multiply 15 rows of padding
  and first move every dequantized weight through shared memory into the MMA layout. Here a
  weight costs an OR-and-mask (LOP3), an FADD (c − zero, dequant_triton.int4_in_place) and one
  FFMA per row of x, all in registers; with the x loads and the shared shift, the sm_90 SASS
  of the K loop has 5.4 thread-instructions per int4 weight at M = 1 and 7.5 at M = 2,
  against 8.7 for the dot path's 16-row tile (matmul_triton.GEMV_MAX_M). An SM issues 128
  thread-instructions a clock, so 132 SMs at 1.98 GHz turn ~6·10^12 int4 weights/s into
  floats: ~3 TB/s of packed weight, about three quarters of an H200's measured HBM copy. The
  kernel is issue bound before it is memory bound; NF4's table gather (7.0 per weight) more so.
- The per-group scale applied once per step: the step (≤ one group) accumulates
  Σ x·(c − zero) in fp32 and multiplies by the scale once per word row, not per weight.
The accumulator keeps the word-row axis ([BLOCK_M, BLOCK_K/8, BLOCK_N]): adding across it
would need lanes of other threads every step; the cross-thread sum happens once, after the K
loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels import launch
from kernels.quant.dequant_triton import (
    code_value,
    finish,
    group_constants,
    int4_in_place,
    int8_to_float,
    nibble,
)


@triton.jit
def quant_gemv_kernel(
    X, X_SCALE, DATA, SCALE, ZERO, CODE, DQS, DQM, OUT, PART,   # PART [S, M, N] if SPLIT
    M, N, K, KG, K_PER_SPLIT,
    stride_xm, stride_xk, stride_dk, stride_dn, stride_sk, stride_sn, stride_om, stride_on,
    FMT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    # the grid of quant_matmul_kernel, (row blocks = 1, column blocks, splits): one launcher
    rows = tl.arange(0, BLOCK_M)                 # every row of x: M ≤ BLOCK_M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_ok = rows < M
    col_ok = cols < N
    k_lo = split * K_PER_SPLIT                   # a multiple of BLOCK_K
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    # Every tensor is 3-D [rows, k, columns], loads included, so the loads' coalesced layout
    # (16 bytes a thread along N) is the layout the arithmetic runs in: a 2-D load broadcast
    # to 3-D went through shared memory (a layout conversion, kclub compile's smem column).
    x_rows = (X + launch.offset(rows, stride_xm))[:, None, None]       # [BM, 1, 1]
    m_ok = row_ok[:, None, None]
    c3 = cols[None, None, :]
    n_ok = col_ok[None, None, :]
    if FMT <= 1:    # 8-bit weight: [BLOCK_K, BLOCK_N] bytes a step; K may be odd
        if FMT == 1:
            acc = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K))[None, :, None]
            k_ok = ks < k_hi
            q = tl.load(DATA + ks * stride_dk + c3 * stride_dn, mask=k_ok & n_ok, other=0)
            x = tl.load(x_rows + ks * stride_xk, mask=m_ok & k_ok, other=0)
            if FMT == 1:   # llm.int8: int8 · int8 summed exactly in int32
                acc += x.to(tl.int32) * q.to(tl.int32)
            else:
                acc += x.to(tl.float32) * int8_to_float(q)
    else:           # 4-bit: [BLOCK_K/8, BLOCK_N] int32 words a step, inside one group
        acc = tl.zeros((BLOCK_M, BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        j = tl.arange(0, BLOCK_K // 8)[None, :, None]
        w_offs = j * stride_dk + c3 * stride_dn          # loop-invariant, as are x's below
        for k0 in range(k_lo, k_hi, BLOCK_K):
            packed = tl.load(DATA + (k0 // 8) * stride_dk + w_offs, mask=n_ok, other=0)
            mult, zero = group_constants(SCALE, ZERO, DQS, DQM, k0 // GROUP, c3, n_ok, KG,
                                         stride_sk, stride_sn, FMT == 3, DOUBLE_QUANT,
                                         DQ_BLOCK)
            x_step = x_rows + k0 * stride_xk
            part = tl.zeros((BLOCK_M, BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            for i in tl.static_range(8):     # code i of every word: rows k0 + 8j + i
                if FMT == 3:
                    w = code_value(nibble(packed, i), CODE, zero, True)
                else:
                    w = int4_in_place(packed, i, zero)
                x = tl.load(x_step + (8 * j + i) * stride_xk, mask=m_ok, other=0)
                part += x.to(tl.float32) * w
            acc += part * mult
    finish(tl.sum(acc, axis=1), rows, cols, row_ok, col_ok, split, SCALE, X_SCALE, OUT, PART,
           M, N, stride_om, stride_on, FMT, SPLIT)

