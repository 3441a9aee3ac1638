"""Quantized matmul in Pallas (JAX), laid out for a TPU: the Triton kernel's contract.

One grid step owns a (tm, tn) output block and the whole K extent of its x rows and weight
columns (K fits VMEM for Llama-7B's 4096). Inside the body a static loop walks K in chunks of
tk = 8 · group (512 for int8): each chunk's packed codes are unpacked and scaled in VMEM and fed
to the MXU, fp32 accumulation, so the weight exists in 16 bits only one [tk, tn] chunk at a time.
Chunk sizes keep every slice on the TPU's (8, 128) tiles: tk/8 packed rows and tk/group scale
rows are multiples of 8, and the unpack is a broadcast over a new axis of 8 followed by a
reshape that merges it into the row axis (tile-aligned, so no relayout).

Differences from the Triton kernel, all in what is read, none in the result:
- nf4: double quantization is undone before the call (absmax in fp32, 0.5 bit per weight
  instead of 0.127): rebuilding it in the kernel needs a gather by 256-block, which Mosaic lacks.
- int4: the uint8 zero points are widened to int32 before the call (Mosaic's uint8 support is
  thin); NF4's table is a chain of 16 selects (no gather either).
TPU only: the Triton lowering wants power-of-two blocks and K is whole here; on a GPU use
`quantized_matmul` (kernels/quant/matmul_triton.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.device import pallas_interpret
from kernels.quant._args import check_matmul_args
from kernels.quant.formats import FORMATS, NF4_CODE, QuantizedWeight
from kernels.tpu_lowering import compiler_params, pad_to_multiple, require_tpu

_NF4 = tuple(float(v) for v in NF4_CODE)


def _chunk(k: int, group: int | None) -> int:
    tk = 512 if group is None else 8 * group
    return tk if k % tk == 0 else k


def _nf4_lookup(codes):
    w = jnp.zeros(codes.shape, jnp.float32)
    for i, v in enumerate(_NF4):
        w = jnp.where(codes == i, v, w)
    return w


def _expand_rows(a, times: int):
    """[r, tn] -> [r · times, tn], each row repeated `times` times (a tile-aligned reshape)."""
    r, tn = a.shape
    return jnp.broadcast_to(a[:, None, :], (r, times, tn)).reshape(r * times, tn)


def _kernel(*refs, fmt, group, tk, k):
    x_ref, data_ref, scale_ref = refs[:3]
    o_ref = refs[-1]
    tm, tn = o_ref.shape
    acc = jnp.zeros((tm, tn), jnp.int32 if fmt == "llm.int8" else jnp.float32)
    for c in range(k // tk):                                  # static: aligned slices
        x = x_ref[:, c * tk:(c + 1) * tk]                     # [tm, tk]
        if fmt in ("int8", "llm.int8"):
            w = data_ref[c * tk:(c + 1) * tk, :]              # int8 [tk, tn]
            if fmt == "llm.int8":                             # int8 x int8 -> int32 (MXU)
                acc += jnp.dot(x, w, preferred_element_type=jnp.int32)
                continue
            w = w.astype(x.dtype)
        else:
            packed = data_ref[c * tk // 8:(c + 1) * tk // 8, :]            # [tk/8, tn]
            shifts = 4 * jax.lax.broadcasted_iota(jnp.int32, (1, 8, 1), 1)
            codes = ((packed[:, None, :] >> shifts) & 0xF).reshape(tk, tn)  # row 8j + i
            rows = slice(c * tk // group, (c + 1) * tk // group)
            scale = _expand_rows(scale_ref[rows, :].astype(jnp.float32), group)
            if fmt == "int4":
                zero = _expand_rows(refs[3][rows, :], group)
                w = (codes - zero).astype(jnp.float32) * scale
            else:
                w = _nf4_lookup(codes) * scale
            w = w.astype(x.dtype)
        acc += jnp.dot(x, w, preferred_element_type=jnp.float32)
    y = acc.astype(jnp.float32)
    if fmt in ("int8", "llm.int8"):                           # per-column (and row) scales
        y = y * scale_ref[...]
        if fmt == "llm.int8":
            y = y * refs[3][...]
    o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "group", "tm", "tn", "out_dtype"))
def _call(x, data, scale, extra, *, fmt, group, tm, tn, out_dtype):
    m, k = x.shape
    n = data.shape[1]
    tk = _chunk(k, group)
    xp = pad_to_multiple(x, 0, tm)
    ops = [xp, pad_to_multiple(data, 1, tn), pad_to_multiple(scale, 1, tn)]
    specs = [pl.BlockSpec((tm, k), lambda i, j: (i, 0)),
             pl.BlockSpec((data.shape[0], tn), lambda i, j: (0, j)),
             pl.BlockSpec((scale.shape[0], tn), lambda i, j: (0, j))]
    if fmt == "int4":
        ops.append(pad_to_multiple(extra, 1, tn))
        specs.append(pl.BlockSpec((extra.shape[0], tn), lambda i, j: (0, j)))
    elif fmt == "llm.int8":                                   # the row scales of x [M, 1]
        ops.append(pad_to_multiple(extra, 0, tm))
        specs.append(pl.BlockSpec((tm, 1), lambda i, j: (i, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, fmt=fmt, group=group, tk=tk, k=k),
        grid=(xp.shape[0] // tm, ops[1].shape[1] // tn),
        in_specs=specs,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], ops[1].shape[1]), out_dtype),
        interpret=pallas_interpret(),
        compiler_params=compiler_params("tpu", ("parallel", "parallel")),
    )(*ops)
    return out[:m, :n]


def _split_outliers(x, threshold: float):
    """LLM.int8()'s decomposition in jnp (kernels/quant/reference.py has the torch one)."""
    outlier = jnp.any(jnp.abs(x) > threshold, axis=0)
    regular = jnp.where(outlier[None, :], 0.0, x.astype(jnp.float32))
    row_scale = jnp.maximum(jnp.max(jnp.abs(regular), axis=1) / 127, np.finfo(np.float32).tiny)
    x_int8 = jnp.clip(jnp.round(regular / row_scale[:, None]), -127, 127).astype(jnp.int8)
    return x_int8, row_scale, outlier


def quantized_matmul_pallas(x, qw: QuantizedWeight, *, tm: int | None = None, tn: int = 128):
    """y [M, N] = x [M, K] @ dequantize(qw)ᵀ for a jax array x and a torch-made QuantizedWeight
    (its tensors are read as arrays); fp32 accumulation, y in x's dtype. tm: rows per block, a
    multiple of 8 (default 8 for M ≤ 16, decode, else 128); tn a multiple of 128."""
    require_tpu("quantized_matmul_pallas", "kernels.quant.quantized_matmul (Triton)")
    m, k, n = check_matmul_args(x, qw, FORMATS)
    tm = tm or (8 if m <= 16 else 128)
    if tm <= 0 or tm % 8 or tn <= 0 or tn % 128:
        raise ValueError(f"tm={tm} must be a positive multiple of 8 and tn={tn} of 128 (TPU "
                         f"tiles)")

    def arr(t):
        return jnp.asarray(t.detach().cpu().numpy())

    data, extra, outlier_part = arr(qw.data), None, None
    if qw.fmt in ("int8", "llm.int8"):
        scale = arr(qw.scale)[None, :]
    elif qw.fmt == "int4":
        scale, extra = arr(qw.scale), arr(qw.zero).astype(jnp.int32)
    else:
        scale = arr(qw.absmax().float())
    x_in = x
    if qw.fmt == "llm.int8":
        x_in, row_scale, outlier = _split_outliers(x, qw.threshold)
        extra = row_scale[:, None]
        w_rows = data.astype(jnp.float32) * scale               # only outlier rows are used
        outlier_part = jnp.where(outlier[None, :], x.astype(jnp.float32), 0.0) @ w_rows
    out_dtype = jnp.float32 if qw.fmt == "llm.int8" else x.dtype
    y = _call(x_in, data, scale, extra, fmt=qw.fmt, group=qw.group_size, tm=tm, tn=tn,
              out_dtype=out_dtype)
    if outlier_part is not None:
        y = (y + outlier_part).astype(x.dtype)
    return y
