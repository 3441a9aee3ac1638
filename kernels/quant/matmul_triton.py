"""Quantized matmul in Triton: y = x @ Wᵀ with W dequantized tile by tile inside the K loop.

The weight never exists in full precision in memory: each program walks K in BLOCK_K steps,
loads the packed codes of a [BLOCK_K, BLOCK_N] tile (4 or 8 bits each) and their group's
constants, rebuilds the tile in registers in x's dtype, and feeds tl.dot, accumulating in fp32.
What a decode step reads from DRAM is then the packed bytes, not 2 bytes per weight: the whole
point of weight-only quantization while decode is memory bound (gpt-fast's int4/int8 kernels,
GPTQ §5 "the kernel dequantizes on the fly", QLoRA's 4-bit inference kernel).

- int8 (weight-only): codes to floats in the loop; the per-column scale is applied once after
  it (kernels/quant/dequant_triton.py: codes become floats by OR-ing into 2^23, not by I2F).
- llm.int8: x arrives already int8 per row (the regular columns); int8 × int8 tl.dot into an
  int32 accumulator (tensor-core IMMA on a GPU), then row scale × column scale. The few outlier
  columns of x go through a 16-bit matmul in the launcher, as in bitsandbytes.
- int4 / nf4: BLOCK_K divides the group, so a step reads one scale (and zero, or absmax) per
  column. int4: w = scale · (q − zero). nf4: w = NF4_CODE[q] · absmax, the code a 16-entry
  table gathered from memory (it stays in L1); with double quantization absmax itself is
  rebuilt from its int8 value, its 256-block's scale and the mean.
Three configurations, chosen by `plan` from (M, N, K, SM count):
- "gemv" (M ≤ 2): kernels/quant/gemv_triton.py, multiply-reduce without tensor cores;
- "decode" (M ≤ 16): this kernel with a 16-row tile;
- "prefill" (128 × 128 tiles, where the tile is reused across rows and compute starts to
  matter), unchanged, never split.
Both decode configurations split K when the (row, column) tiles alone cannot fill the GPU's
SMs: each program reduces a slice of K, and dequant_triton.splitk_reduce_kernel sums the
partials and applies the epilogue.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import launch
from kernels.device import INTERPRET, new_output, target_sm_count
from kernels.quant._args import check_matmul_args
from kernels.quant.dequant_triton import (
    code_value,
    finish,
    group_constants,
    int8_to_float,
    reduce_splits,
)
from kernels.quant.formats import DQ_BLOCK, FORMATS, NF4_CODE, QuantizedWeight
from kernels.quant.gemv_triton import quant_gemv_kernel
from kernels.quant.reference import llm_int8_outlier_part, split_outliers
from kernels.validate import FLOAT_DTYPES, check_same_device

FMT_ID = {"int8": 0, "llm.int8": 1, "int4": 2, "nf4": 3}


@dataclass(frozen=True)
class Config:
    """Tiles and launch. 4-bit formats step by min(group, block_k), one group's constants a
    step. Prefill at 128 × 128 × 128 spilled on sm_80 for int4 (kclub compile): block_k 64.
    gemv: block_m is M rounded up to a power of two; block_k is for the 4-bit formats, the
    8-bit ones step by block_k // 2 rows (the same 8 KB of codes per step)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    gemv: bool = False

    def step(self, fmt: str, group: int | None) -> int:
        """K per step of the loop for weights of `fmt` with `group`."""
        if group is None:
            return self.block_k // 2 if self.gemv else self.block_k
        return min(group, self.block_k)


CONFIGS = {
    "gemv": Config(block_m=1, block_n=512, block_k=32, num_warps=4, num_stages=1, gemv=True),
    "decode": Config(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4),
    "prefill": Config(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
}
# Thread-instructions per weight in the K loop, counted in the sm_90 SASS (int4; nf4 and int8
# alike): gemv 5.4 at M = 1, 7.5 at M = 2, 11.4 at M = 3-4 (a 4-row tile); the 16-row dot tile
# 8.7 whatever M ≤ 16 is. So the gemv takes M ≤ 2 (gemv_triton.py says where they go).
GEMV_MAX_M = 2
DECODE_MAX_M = 16
# Split K until (row tiles × column tiles × splits) programs put WARPS_PER_SM warps on every
# SM: with ~96 registers a thread (kclub compile), 16 warps fit on an SM at once, each with
# a 2 KB step of loads in flight, ~32 KB per SM, about what HBM bandwidth × latency asks for
# (4 TB/s × ~1 µs over 132 SMs). A split covers at least MIN_SPLIT_STEPS steps (its x loads
# and partial store amortised) and there are at most MAX_SPLITS (their partials, M·N·4
# bytes each, are written and re-read: 4% of the int4 weight at N = 11008, M = 1, 22 splits).
WARPS_PER_SM = 16
MIN_SPLIT_STEPS = 2
MAX_SPLITS = 32


@dataclass(frozen=True)
class Plan:
    config: Config
    splits: int
    k_per_split: int     # a multiple of the config's step for this format


def sm_count(device: torch.device) -> int:
    """SMs of `device` when it is the GPU we run on, else the compile target's (or the
    interpreter's) row of SM_COUNT, Hopper's for targets not listed."""
    if device.type == "cuda" and not INTERPRET:
        return _cuda_sms(device.index if device.index is not None else
                         torch.cuda.current_device())
    return target_sm_count()


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def config_for(m: int) -> Config:
    if m <= GEMV_MAX_M:
        return CONFIGS["gemv"]
    return CONFIGS["decode" if m <= DECODE_MAX_M else "prefill"]


def split_plan(cfg: Config, m: int, n: int, k: int, step: int, sms: int,
               splits: int | None = None) -> tuple[int, int]:
    """(splits, K per split): enough programs to fill `sms` SMs (module constants), no split
    empty; 1 for the prefill tile. `splits` forces a count (capped at the number of steps)."""
    steps = triton.cdiv(k, step)
    if splits is None and cfg.block_m > DECODE_MAX_M:
        splits = 1
    elif splits is None:
        tiles = (1 if cfg.gemv else triton.cdiv(m, cfg.block_m)) * triton.cdiv(n, cfg.block_n)
        programs = triton.cdiv(WARPS_PER_SM * sms, cfg.num_warps)
        splits = min(triton.cdiv(programs, tiles), steps // MIN_SPLIT_STEPS, MAX_SPLITS)
    per = triton.cdiv(steps, max(1, min(splits, steps)))
    return triton.cdiv(steps, per), per * step


@functools.lru_cache(maxsize=1024)   # pure; a decode step asks the same few shapes each token
def plan(m: int, n: int, k: int, fmt: str, group: int | None, sms: int, *,
         config: Config | None = None, splits: int | None = None) -> Plan:
    """The configuration and K split for an [m, k] × [k, n] product of `fmt` weights."""
    cfg = config or config_for(m)
    if cfg.gemv and m > DECODE_MAX_M:
        raise ValueError(f"the gemv config holds every row in one tile: M={m} > {DECODE_MAX_M}")
    s, per = split_plan(cfg, m, n, k, cfg.step(fmt, group), sms, splits)
    return Plan(cfg, s, per)


@triton.jit
def _dequant_4bit(DATA, SCALE, ZERO, CODE, DQS, DQM, k0, g, cols, col_ok, KG,
                  stride_dk, stride_dn, stride_sk, stride_sn,
                  IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, OUT_TY: tl.constexpr,
                  SCALED: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile of rows k0.. of Wᵀ, rebuilt in registers, and the
    group's multiplier per column. SCALED: the tile is the weight; else it is the unscaled
    c − zero (exact in 16 bits) or NF4 code, and the caller scales the dot's result: per
    step that is BLOCK_M · BLOCK_N multiplies instead of BLOCK_K · BLOCK_N."""
    words = k0 // 8 + tl.arange(0, BLOCK_K // 8)                      # 8 codes per int32
    packed = tl.load(DATA + words[:, None] * stride_dk + cols[None, :] * stride_dn,
                     mask=col_ok[None, :], other=0)                   # [BK/8, BN]
    shifts = 4 * tl.arange(0, 8)
    codes = (packed[:, None, :] >> shifts[None, :, None]) & 0xF       # [BK/8, 8, BN]
    codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))                     # row k0 + 8j + i
    mult, zero = group_constants(SCALE, ZERO, DQS, DQM, g, cols, col_ok, KG, stride_sk,
                                 stride_sn, IS_NF4, DOUBLE_QUANT, DQ_BLOCK)
    w = code_value(codes, CODE, zero[None, :], IS_NF4)
    if SCALED:
        w = w * mult[None, :]
    return w.to(OUT_TY), mult


@triton.jit
def quant_matmul_kernel(
    X, X_SCALE, DATA, SCALE, ZERO, CODE, DQS, DQM, OUT, PART,   # PART [S, M, N] if SPLIT
    M, N, K, KG, K_PER_SPLIT,                                   # KG = K / group
    stride_xm, stride_xk, stride_dk, stride_dn, stride_sk, stride_sn, stride_om, stride_on,
    FMT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_ok = rows < M
    col_ok = cols < N
    k_lo = split * K_PER_SPLIT                   # a multiple of BLOCK_K
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + launch.offset(rows[:, None], stride_xm) + (k_lo + offs_k)[None, :] * stride_xk
    if FMT == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k0 + offs_k < k_hi
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0)  # [BM, BK]
        if FMT <= 1:   # int8 codes [BK, BN]
            w = tl.load(DATA + (k0 + offs_k)[:, None] * stride_dk + cols[None, :] * stride_dn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0)
            if FMT == 1:
                acc = tl.dot(x, w, acc, out_dtype=tl.int32)   # int8 · int8 -> int32
            else:
                acc = tl.dot(x, int8_to_float(w).to(X.dtype.element_ty), acc)
        else:
            # scale before the dot where BLOCK_K < BLOCK_M (prefill), after it where fewer
            w, mult = _dequant_4bit(DATA, SCALE, ZERO, CODE, DQS, DQM, k0, k0 // GROUP, cols,
                                    col_ok, KG, stride_dk, stride_dn, stride_sk, stride_sn,
                                    FMT == 3, DOUBLE_QUANT, DQ_BLOCK, BLOCK_K, BLOCK_N,
                                    X.dtype.element_ty, BLOCK_K <= BLOCK_M)
            if BLOCK_K <= BLOCK_M:
                acc = tl.dot(x, w, acc)
            else:
                acc += tl.dot(x, w) * mult[None, :]
        x_ptrs += BLOCK_K * stride_xk
    finish(acc, rows, cols, row_ok, col_ok, split, SCALE, X_SCALE, OUT, PART, M, N,
           stride_om, stride_on, FMT, SPLIT)


@functools.cache
def _nf4_code(device: torch.device) -> torch.Tensor:
    """NF4_CODE on `device`, copied once (a copy per call would be a host-device sync)."""
    return NF4_CODE.to(device)


def _check_splits(splits) -> None:
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int)
                               or splits < 1):
        raise ValueError(f"splits must be a positive int or None, got {splits!r}")


def quantized_matmul(x: torch.Tensor, qw: QuantizedWeight, *, config: Config | None = None,
                     splits: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequantize(qw)ᵀ in x's dtype (fp32 accumulation): one launch, or
    two when K is split (`plan`; `splits` forces a count, `config` a tile), plus, for
    llm.int8, the int8 cast of x and the 16-bit outlier matmul around it."""
    # the interpreter computes bf16 on raw bits (docs/cpu-notes.md): bf16 is for the GPU path
    dtypes = FLOAT_DTYPES[:2] if INTERPRET else FLOAT_DTYPES
    m, k, n = check_matmul_args(x, qw, FORMATS)
    if x.dtype not in dtypes:
        raise TypeError(f"x must have dtype in {dtypes} here (the interpreter computes bf16 "
                        f"wrongly), got {x.dtype}")
    check_same_device(("x", x), ("qw.data", qw.data))
    _check_splits(splits)
    p = plan(m, n, k, qw.fmt, qw.group_size, sm_count(x.device), config=config, splits=splits)
    cfg, fmt = p.config, FMT_ID[qw.fmt]
    # llm.int8 adds the outlier matmul to the kernel's result: keep that in fp32 until then
    out = new_output((m, n), torch.float32 if fmt == 1 else x.dtype, x.device)
    x_in, x_scale, extra = x, qw.scale, None
    if qw.fmt == "llm.int8":
        x_in, x_scale, outlier = split_outliers(x, qw.threshold)
        extra = llm_int8_outlier_part(x, qw, outlier)
    group = qw.group_size or 1
    # formats without zeros or double quantization pass any tensor there: the constexpr
    # branches that would read them are compiled out
    code = _nf4_code(x.device) if qw.fmt == "nf4" else qw.scale
    zero = qw.zero if qw.zero is not None else qw.scale
    dqs = qw.dq_scale if qw.dq_scale is not None else qw.scale
    dqm = qw.dq_mean if qw.dq_mean is not None else qw.scale
    # the partials: K sums before any scale, exact int32 for llm.int8
    part = out if p.splits == 1 else new_output(
        (p.splits, m, n), torch.int32 if fmt == 1 else torch.float32, x.device)
    kernel = quant_gemv_kernel if cfg.gemv else quant_matmul_kernel
    block_m = triton.next_power_of_2(m) if cfg.gemv else cfg.block_m
    grid = launch.grid(triton.cdiv(m, block_m), triton.cdiv(n, cfg.block_n), p.splits)
    stride_sk, stride_sn = qw.scale.stride() if qw.scale.ndim == 2 else (0, 1)
    kernel[grid](
        x_in, x_scale, qw.data, qw.scale, zero, code, dqs, dqm, out, part,
        m, n, k, k // group, p.k_per_split,
        x_in.stride(0), x_in.stride(1), qw.data.stride(0), qw.data.stride(1),
        stride_sk, stride_sn, out.stride(0), out.stride(1),
        FMT=fmt, DOUBLE_QUANT=qw.double_quant, DQ_BLOCK=DQ_BLOCK, GROUP=group,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.step(qw.fmt, qw.group_size),
        SPLIT=p.splits > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if p.splits > 1:
        reduce_splits(part, qw.scale, x_scale, out, fmt)
    if extra is not None:
        out = (out + extra).to(x.dtype)
    return out
