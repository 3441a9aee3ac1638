"""Triton pieces that both quantized matmuls share: weight codes to floats, group constants,
and the epilogue that scales the K sum and stores it (or a split's partial of it).

Codes become floats without I2F. A code c (0 ≤ c < 2^23) ORed into the mantissa of 2^23
(bits 0x4B000000) is the float 2^23 + c, exactly; subtracting 2^23 + zero gives c − zero,
exactly. That is one LOP3 and one FADD, full-rate ALU work, where `c.to(tl.float32)` is an I2F,
which sm_80 and sm_90 run at 16 per clock per SM against 64-128 for the ALU pipes (CUDA C
Programming Guide, "Arithmetic Instructions"): at decode an H100 must turn ~8·10^12 int4 codes
per second into floats to keep up with HBM, and I2F alone would cap it near half of that. The
same trick as FasterTransformer's and Marlin's int4 → fp16 conversion (there with 0x6400, in
half precision); fp32 here keeps the trick exact for any zero and int8 code.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels import launch

MAGIC = tl.constexpr(8388608.0)   # 2^23, the float 0x4B000000


@triton.jit
def _biased(code):
    """2^23 + code as fp32, for int32 0 ≤ code < 2^23 (one OR, no conversion)."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def int8_to_float(q):
    """int8 codes (any shape) as fp32, exactly: the byte + 128 is in 0..255, biased, minus
    2^23 + 128 (two's complement: flipping bit 7 of the byte adds 128)."""
    return _biased((q.to(tl.int32) & 0xFF) ^ 0x80) - (8388608.0 + 128.0)


@triton.jit
def nibble(packed, i: tl.constexpr):
    """Code i (bits 4i..4i+3) of each int32 word: row k = 8j + i of word row j."""
    return (packed >> (4 * i)) & 0xF


@triton.jit
def int4_in_place(packed, i: tl.constexpr, zero):
    """Code i of each word minus `zero`, as fp32, in 2 ALU ops (LOP3, FADD) plus one shared
    shift per word: the nibble is masked where it lies, at bit b = 4·(i mod 4) of the word or
    of its upper half, and given the exponent 23 − b, under which bit b weighs 1: the float
    is 2^(23−b) + c exactly, and subtracting 2^(23−b) + zero leaves c − zero."""
    half = packed if i < 4 else packed >> 16          # bits 16+ are masked off below
    bit = 4 * (i % 4)                                 # constexpr, as i is
    f = ((half & (0xF << bit)) | ((127 + 23 - bit) << 23)).to(tl.float32, bitcast=True)
    return f - ((1 << (23 - bit)) + zero)


@triton.jit
def group_constants(SCALE, ZERO, DQS, DQM, g, cols, col_ok, KG, stride_sk, stride_sn,
                    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK: tl.constexpr):
    """Group g's constants per column, fp32, shaped like `cols`: (multiplier, zero). A 4-bit
    weight is multiplier · (c − zero) for int4 (scale, zero), multiplier · NF4_CODE[c] for
    nf4 (absmax, zero 0, unused)."""
    const = SCALE + g * stride_sk + cols * stride_sn
    if IS_NF4:
        if DOUBLE_QUANT:   # absmax = int8 · scale of its 256-block + mean; block b = n·KG + g
            second = tl.load(DQS + (cols * KG + g) // DQ_BLOCK, mask=col_ok, other=0.0)
            mult = tl.load(const, mask=col_ok, other=0).to(tl.float32) * second
            mult += tl.load(DQM)
        else:
            mult = tl.load(const, mask=col_ok, other=0.0)
        zero = tl.zeros_like(mult)
    else:
        mult = tl.load(const, mask=col_ok, other=0.0).to(tl.float32)
        # once per column and step: an I2F here is cheap
        zero = tl.load(ZERO + g * stride_sk + cols * stride_sn, mask=col_ok, other=0)
        zero = zero.to(tl.float32)
    return mult, zero


@triton.jit
def code_value(code, CODE, zero, IS_NF4: tl.constexpr):
    """A 4-bit code's unscaled value (times the group's multiplier gives the weight): int4
    c − zero, nf4 NF4_CODE[c]. NF4's 16 values have no closed form; a select tree costs ~19
    ALU ops per weight, the gather one L1 load from a 64-byte table (every lane of a warp in
    one cache line, so one wavefront) and its address."""
    if IS_NF4:
        return tl.load(CODE + code)
    return _biased(code) - (MAGIC + zero)


@triton.jit
def finish(total, rows, cols, row_ok, col_ok, split, SCALE, X_SCALE, OUT, PART, M, N,
           stride_om, stride_on, FMT: tl.constexpr, SPLIT: tl.constexpr):
    """Store a program's K sum [BLOCK_M, BLOCK_N]: raw into PART[split] (fp32, int32 for
    llm.int8) when K is split, else through `epilogue` into OUT."""
    if SPLIT:
        base = PART + launch.offset(split * M + rows, N)
        tl.store(base[:, None] + cols[None, :], total, mask=row_ok[:, None] & col_ok[None, :])
    else:
        epilogue(total, rows, cols, row_ok, col_ok, SCALE, X_SCALE, OUT, stride_om, stride_on,
                 FMT)


@triton.jit
def epilogue(total, rows, cols, row_ok, col_ok, SCALE, X_SCALE, OUT, stride_om, stride_on,
             FMT: tl.constexpr):
    """y = the K sum, times the per-column scale (8-bit formats; it does not depend on k, so
    scaling the sum is the same math with fewer ops) and llm.int8's per-row one; stored in
    OUT's dtype."""
    if FMT <= 1:
        y = total.to(tl.float32) * tl.load(SCALE + cols, mask=col_ok, other=0.0)[None, :]
        if FMT == 1:
            y = y * tl.load(X_SCALE + rows, mask=row_ok, other=0.0)[:, None]
    else:
        y = total
    ptrs = OUT + launch.offset(rows[:, None], stride_om) + cols[None, :] * stride_on
    tl.store(ptrs, y.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def splitk_reduce_kernel(PART, SCALE, X_SCALE, OUT, M, N, SPLITS, stride_om, stride_on,
                         FMT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """Second pass of split-K: OUT[row, cols] = epilogue(Σ_s PART[s, row, cols]). A fixed
    order of the sum, so a result does not depend on which split finished first (fp32 atomics
    into a zeroed output would, and would need a zeroing launch and a cast launch besides)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    s = tl.arange(0, BLOCK_S)
    ptrs = PART + launch.offset(s * M + row, N)[:, None] + cols[None, :]
    part = tl.load(ptrs, mask=(s < SPLITS)[:, None] & col_ok[None, :], other=0)
    rows = row + tl.arange(0, 1)
    epilogue(tl.sum(part, axis=0)[None, :], rows, cols, rows < M, col_ok, SCALE, X_SCALE, OUT,
             stride_om, stride_on, FMT)


REDUCE_BLOCK_N = 512


def reduce_splits(part, scale, x_scale, out, fmt_id: int) -> None:
    """Launch splitk_reduce_kernel over partials [S, M, N] into out [M, N]."""
    splits, m, n = part.shape
    grid = launch.grid(m, triton.cdiv(n, REDUCE_BLOCK_N))
    splitk_reduce_kernel[grid](part, scale, x_scale, out, m, n, splits, out.stride(0),
                               out.stride(1), FMT=fmt_id, BLOCK_S=triton.next_power_of_2(splits),
                               BLOCK_N=REDUCE_BLOCK_N, num_warps=4)
