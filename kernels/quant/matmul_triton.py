"""Quantized matmul in Triton: y = x @ Wᵀ with W dequantized tile by tile inside the K loop.

The weight never exists in full precision in memory: each program walks K in BLOCK_K steps,
loads the packed codes of a [BLOCK_K, BLOCK_N] tile (4 or 8 bits each) and their group's
constants, rebuilds the tile in registers in x's dtype, and feeds tl.dot, accumulating in fp32.
What a decode step reads from DRAM is then the packed bytes, not 2 bytes per weight: the whole
point of weight-only quantization while decode is memory bound (gpt-fast's int4/int8 kernels,
GPTQ §5 "the kernel dequantizes on the fly", QLoRA's 4-bit inference kernel).

- int8 (weight-only): codes cast to x's dtype in the loop; the per-column scale is applied once
  after it (it does not depend on k, so scaling the [M, N] sum is the same math, fewer ops).
- llm.int8: x arrives already int8 per row (the regular columns); int8 × int8 tl.dot into an
  int32 accumulator (tensor-core IMMA on a GPU), then row scale × column scale. The few outlier
  columns of x go through a 16-bit matmul in the launcher, as in bitsandbytes.
- int4 / nf4: BLOCK_K divides the group, so a step reads one scale (and zero, or absmax) per
  column. int4: w = scale · (q − zero). nf4: w = NF4_CODE[q] · absmax, the code a 16-entry
  table gathered from memory (it stays in L1); with double quantization absmax itself is
  rebuilt from its int8 value, its 256-block's scale and the mean.
Two configurations: "decode" (M ≤ 16 rows: a 16-row tile, N split wide for parallelism) and
"prefill" (128 × 128 tiles, where the tile is reused across rows and compute starts to matter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import launch
from kernels.device import INTERPRET, new_output
from kernels.quant._args import check_matmul_args
from kernels.quant.formats import DQ_BLOCK, FORMATS, NF4_CODE, QuantizedWeight
from kernels.quant.reference import llm_int8_outlier_part, split_outliers
from kernels.validate import FLOAT_DTYPES, check_same_device

FMT_ID = {"int8": 0, "llm.int8": 1, "int4": 2, "nf4": 3}


@dataclass(frozen=True)
class Config:
    """Tiles and launch. 4-bit formats step by min(group, block_k), one group's constants a
    step. Prefill at 128 × 128 × 128 spilled on sm_80 for int4 (kclub compile): block_k 64."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


CONFIGS = {
    "decode": Config(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4),
    "prefill": Config(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
}
DECODE_MAX_M = 16


@triton.jit
def _dequant_4bit(DATA, SCALE, ZERO, CODE, DQS, DQM, k0, g, cols, col_ok, KG,
                  stride_dk, stride_dn, stride_sk, stride_sn,
                  IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK: tl.constexpr,
                  BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, OUT_TY: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile of rows k0.. of Wᵀ, rebuilt in registers."""
    words = k0 // 8 + tl.arange(0, BLOCK_K // 8)                      # 8 codes per int32
    packed = tl.load(DATA + words[:, None] * stride_dk + cols[None, :] * stride_dn,
                     mask=col_ok[None, :], other=0)                   # [BK/8, BN]
    shifts = 4 * tl.arange(0, 8)
    codes = (packed[:, None, :] >> shifts[None, :, None]) & 0xF       # [BK/8, 8, BN]
    codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))                     # row k0 + 8j + i
    const = SCALE + g * stride_sk + cols * stride_sn                  # one per column
    if IS_NF4:
        if DOUBLE_QUANT:   # absmax = int8 · scale of its 256-block + mean; block b = n·KG + g
            second = tl.load(DQS + (cols * KG + g) // DQ_BLOCK, mask=col_ok, other=0.0)
            absmax = tl.load(const, mask=col_ok, other=0).to(tl.float32) * second
            absmax += tl.load(DQM)
        else:
            absmax = tl.load(const, mask=col_ok, other=0.0)
        w = tl.load(CODE + codes) * absmax[None, :]                   # NF4_CODE[q] · absmax
    else:
        scale = tl.load(const, mask=col_ok, other=0.0).to(tl.float32)
        zero = tl.load(ZERO + g * stride_sk + cols * stride_sn, mask=col_ok, other=0)
        w = (codes - zero[None, :].to(tl.int32)).to(tl.float32) * scale[None, :]
    return w.to(OUT_TY)


@triton.jit
def quant_matmul_kernel(
    X, X_SCALE, DATA, SCALE, ZERO, CODE, DQS, DQM, OUT,    # x [M, K], data [K(/8), N], out [M, N]
    M, N, K, KG,                                          # KG = K / group: groups per column
    stride_xm, stride_xk, stride_dk, stride_dn, stride_sk, stride_sn, stride_om, stride_on,
    FMT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + launch.offset(rows[:, None], stride_xm) + offs_k[None, :] * stride_xk
    if FMT == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0)  # [BM, BK]
        if FMT <= 1:   # int8 codes [BK, BN]
            w = tl.load(DATA + (k0 + offs_k)[:, None] * stride_dk + cols[None, :] * stride_dn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0)
            if FMT == 1:
                acc = tl.dot(x, w, acc, out_dtype=tl.int32)   # int8 · int8 -> int32
            else:
                acc = tl.dot(x, w.to(X.dtype.element_ty), acc)
        else:
            w = _dequant_4bit(DATA, SCALE, ZERO, CODE, DQS, DQM, k0, k0 // GROUP, cols, col_ok,
                              KG, stride_dk, stride_dn, stride_sk, stride_sn, FMT == 3,
                              DOUBLE_QUANT, DQ_BLOCK, BLOCK_K, BLOCK_N, X.dtype.element_ty)
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
    if FMT <= 1:       # per-column scale (and llm.int8's per-row one) after the K sum
        y = acc.to(tl.float32) * tl.load(SCALE + cols, mask=col_ok, other=0.0)[None, :]
        if FMT == 1:
            y = y * tl.load(X_SCALE + rows, mask=row_ok, other=0.0)[:, None]
    else:
        y = acc
    out_ptrs = OUT + launch.offset(rows[:, None], stride_om) + cols[None, :] * stride_on
    tl.store(out_ptrs, y.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def config_for(m: int) -> Config:
    return CONFIGS["decode" if m <= DECODE_MAX_M else "prefill"]


def quantized_matmul(x: torch.Tensor, qw: QuantizedWeight, *,
                     config: Config | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequantize(qw)ᵀ in x's dtype (fp32 accumulation), in one launch
    (plus, for llm.int8, the int8 cast of x and the 16-bit outlier matmul around it)."""
    # the interpreter computes bf16 on raw bits (docs/cpu-notes.md): bf16 is for the GPU path
    dtypes = FLOAT_DTYPES[:2] if INTERPRET else FLOAT_DTYPES
    m, k, n = check_matmul_args(x, qw, FORMATS)
    if x.dtype not in dtypes:
        raise TypeError(f"x must have dtype in {dtypes} here (the interpreter computes bf16 "
                        f"wrongly), got {x.dtype}")
    check_same_device(("x", x), ("qw.data", qw.data))
    cfg = config or config_for(m)
    fmt = FMT_ID[qw.fmt]
    # llm.int8 adds the outlier matmul to the kernel's result: keep that in fp32 until then
    out = new_output((m, n), torch.float32 if fmt == 1 else x.dtype, x.device)
    x_in, x_scale, extra = x, qw.scale, None
    if qw.fmt == "llm.int8":
        x_in, x_scale, outlier = split_outliers(x, qw.threshold)
        extra = llm_int8_outlier_part(x, qw, outlier)
    group = qw.group_size or 1
    block_k = cfg.block_k if fmt <= 1 else min(group, cfg.block_k)   # divides the group
    code = NF4_CODE.to(x.device)
    # formats without zeros or double quantization pass any tensor there: the constexpr
    # branches that would read them are compiled out
    zero = qw.zero if qw.zero is not None else qw.scale
    dqs = qw.dq_scale if qw.dq_scale is not None else qw.scale
    dqm = qw.dq_mean if qw.dq_mean is not None else qw.scale
    grid = launch.grid(triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    stride_sk, stride_sn = qw.scale.stride() if qw.scale.ndim == 2 else (0, 1)
    quant_matmul_kernel[grid](
        x_in, x_scale, qw.data, qw.scale, zero, code, dqs, dqm, out,
        m, n, k, k // group,
        x_in.stride(0), x_in.stride(1), qw.data.stride(0), qw.data.stride(1),
        stride_sk, stride_sn, out.stride(0), out.stride(1),
        FMT=fmt, DOUBLE_QUANT=qw.double_quant, DQ_BLOCK=DQ_BLOCK, GROUP=group,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if extra is not None:
        out = (out + extra).to(x.dtype)
    return out

