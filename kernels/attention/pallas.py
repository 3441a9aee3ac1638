"""FlashAttention in Pallas on JAX arrays: forward, FA2 backward, jax.custom_vjp.

The same algorithm as the Triton kernels (triton_fwd.py, triton_bwd.py), in Pallas's terms:
the grid and BlockSpecs say which block of each array a program sees, and the kernel body
loops over the other sequence with `lax.fori_loop`, slicing the full K/V (or Q) ref with
`pl.ds`. Differences from the Triton version, on purpose:
- Inputs are zero-padded by the wrapper so every block is full (sequences to a multiple of
  the blocks, head_dim to a power of two): Pallas blocks cannot be ragged on a GPU/TPU and
  interpret mode would clamp an out-of-range slice instead of masking it. Zero head-dim
  columns change no dot product; padded keys are masked; padded query rows are sliced off.
- Natural exp instead of exp2: clearer, and the compiler picks the instruction.
- D = rowsum(dO ∘ O) is one fused XLA reduction, not a kernel.

Lowering, per backend (kernels/tpu_lowering.py picks the target and its compiler params):
- TPU (Mosaic): a block's last two dims must be multiples of (8, 128) or the whole array dim.
  The per-row statistics L (logsumexp) and D are therefore stored lane-dense, (…, seq, 128)
  with the row's value repeated across the 128 lanes, as JAX's own TPU flash attention keeps
  them: a (block_q,) block would be a 1-lane sliver of a vector register, and its last dim
  (block_q) is not the array's. All grid axes are "parallel": no program reads another's
  output. Costs 128 × 4 B per row of HBM for L and for D; cheap next to O and dO at d ≥ 64.
- GPU (Triton, num_warps=4): the statistics keep one lane, (…, seq, 1); blocks are powers of
  two (checked). Without explicit Triton params jax >= 0.10 would pick Mosaic GPU.
- CPU: interpret mode (kernels.device.pallas_interpret()), with the TPU layout unless
  KC_PALLAS_TARGET=gpu; bf16 is computed correctly there (unlike Triton's interpreter).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.attention._args import (
    BlockSizes,
    attention_shape,
    check_causal,
    check_same_dtype,
    padded_head_dim,
    softmax_scale,
)
from kernels.device import pallas_interpret
from kernels.tpu_lowering import check_gpu_blocks, compiler_params, pallas_target

F32 = jnp.float32
_PARALLEL = ("parallel", "parallel", "parallel")  # every program writes only its own blocks


@dataclass(frozen=True)
class _Config:  # static (hashable) arguments of the custom_vjp
    seq_q: int
    seq_k: int
    group: int
    causal: bool
    sm_scale: float
    block_q: int
    block_k: int
    interpret: bool
    target: str            # "tpu" or "gpu": the layout and compiler params (module docstring)

    @property
    def lanes(self) -> int:
        """Minor dim of the per-row statistics L and D: lane-dense on a TPU, one on a GPU."""
        return 128 if self.target == "tpu" else 1

    def resident(self, block_shape, index_map):
        """A whole-sequence block whose index changes only with (batch, head): one VMEM buffer
        on a TPU (pl.Buffered(1)) instead of two, so long sequences fit the VMEM budget; the
        price is that the next head's copy is not overlapped with this head's compute."""
        if self.target != "tpu":
            return pl.BlockSpec(block_shape, index_map)
        return pl.BlockSpec(block_shape, index_map, pipeline_mode=pl.Buffered(1))

    def call(self, kernel, **kw):
        return pl.pallas_call(functools.partial(kernel, cfg=self), interpret=self.interpret,
                              compiler_params=compiler_params(self.target, _PARALLEL), **kw)


def _grid_iota(start, shape, dim):
    """start + index along `dim` of a 2-D block (2-D iota: both TPU and Triton lower it)."""
    return start + lax.broadcasted_iota(jnp.int32, shape, dim)


def _visible(i, j, cfg: _Config):
    """(block_q, block_k) bool: the pair exists and the bottom-right causal mask allows it."""
    shape = (cfg.block_q, cfg.block_k)
    rows, cols = _grid_iota(i * cfg.block_q, shape, 0), _grid_iota(j * cfg.block_k, shape, 1)
    ok = (rows < cfg.seq_q) & (cols < cfg.seq_k)
    if cfg.causal:
        ok &= cols <= rows + (cfg.seq_k - cfg.seq_q)
    return ok


def _kv_end(i, cfg: _Config):
    """Key blocks query block i can see: the rest are skipped (causal block skipping)."""
    if not cfg.causal:
        return pl.cdiv(cfg.seq_k, cfg.block_k)
    last = jnp.clip((i + 1) * cfg.block_q + cfg.seq_k - cfg.seq_q, 0, cfg.seq_k)
    return lax.div(last.astype(jnp.int32) + (cfg.block_k - 1), jnp.int32(cfg.block_k))


def _kv_head(h, group: int):
    """K/V head of query head h. lax.div, not //: h ≥ 0, and `//` is floor division, which the
    TPU lowering builds from sign(), whose lowering needs a TPU device to ask its generation."""
    return lax.div(h, jnp.int32(group))


def _dot(a, b):  # matmul with fp32 accumulation, whatever the input dtype
    return jnp.dot(a, b, preferred_element_type=F32)


def _row_stat(x):
    """(block_q, lanes) block of a per-row statistic → (block_q, 1): every lane holds it."""
    return x[:, :1]


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
    # q_ref, o_ref: (block_q, Dp) of head h; k_ref, v_ref: (Nk_pad, Dp) of head h // group;
    # lse_ref: (block_q, lanes)
    i = pl.program_id(2)
    q = q_ref[...]

    def step(j, carry):  # online softmax over one key block (FA2 §3.1.1); m, l: (block_q, 1)
        acc, m, l = carry
        k = k_ref[pl.ds(j * cfg.block_k, cfg.block_k), :]
        v = v_ref[pl.ds(j * cfg.block_k, cfg.block_k), :]
        s = jnp.where(_visible(i, j, cfg), _dot(q, k.T) * cfg.sm_scale, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # rows with no key yet: exp → 0
        alpha = jnp.exp(m - shift)
        p = jnp.exp(s - shift)
        return (acc * alpha + _dot(p.astype(v.dtype), v),
                m_new, l * alpha + p.sum(axis=1, keepdims=True))

    column = (cfg.block_q, 1)
    init = (jnp.zeros(q.shape, F32), jnp.full(column, -jnp.inf, F32), jnp.zeros(column, F32))
    acc, m, l = lax.fori_loop(0, _kv_end(i, cfg), step, init)
    empty = l == 0.0                                       # no visible key: O = 0, L = +inf
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)   # lane-dense on a TPU


def _forward(q, k, v, cfg: _Config):
    B, H, Nq, Dp = q.shape
    Nk = k.shape[2]
    q_spec = pl.BlockSpec((None, None, cfg.block_q, Dp), lambda b, h, i: (b, h, i, 0))
    kv_spec = cfg.resident((None, None, Nk, Dp), lambda b, h, i: (b, _kv_head(h, cfg.group), 0, 0))
    lse_spec = pl.BlockSpec((None, None, cfg.block_q, cfg.lanes), lambda b, h, i: (b, h, i, 0))
    return cfg.call(
        _fwd_kernel, grid=(B, H, Nq // cfg.block_q),
        in_specs=[q_spec, kv_spec, kv_spec], out_specs=[q_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, Nq, cfg.lanes), F32)],
        name="flash_fwd",
    )(q, k, v)


def _probs_and_ds(q, k, v, do, lse, delta, i, j, cfg: _Config):
    """Recompute P = exp(S − L) for one block, and dS = P ∘ (dO Vᵀ − D) (FA2 §3.1.2)."""
    s = _dot(q, k.T) * cfg.sm_scale
    p = jnp.where(_visible(i, j, cfg), jnp.exp(s - lse), 0.0)
    return p, p * (_dot(do, v.T) - delta)


def _dkdv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, *, cfg):
    # q_ref, do_ref: (group, Nq_pad, Dp), the query heads sharing this K/V head; lse_ref,
    # delta_ref: (group, Nq_pad, lanes); k_ref, v_ref, dk_ref, dv_ref: (block_k, Dp)
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    first = 0   # causal: query blocks wholly above the diagonal see none of these keys
    if cfg.causal:
        seen = jnp.maximum(j * cfg.block_k - (cfg.seq_k - cfg.seq_q), 0).astype(jnp.int32)
        first = lax.div(seen, jnp.int32(cfg.block_q))

    def step(i, carry, g):
        dk, dv = carry
        sl = pl.ds(i * cfg.block_q, cfg.block_q)
        q, do = q_ref[g, sl, :], do_ref[g, sl, :]
        lse, delta = _row_stat(lse_ref[g, sl, :]), _row_stat(delta_ref[g, sl, :])
        p, ds = _probs_and_ds(q, k, v, do, lse, delta, i, j, cfg)
        return dk + _dot(ds.T.astype(q.dtype), q), dv + _dot(p.T.astype(do.dtype), do)

    def head(g, carry):  # dK, dV summed over the group in registers, no atomics
        return lax.fori_loop(first, q_ref.shape[1] // cfg.block_q,
                             functools.partial(step, g=g), carry)

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(0, cfg.group, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *, cfg):
    # q_ref, do_ref, dq_ref: (block_q, Dp); lse_ref, delta_ref: (block_q, lanes);
    # k_ref, v_ref: (Nk_pad, Dp)
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = _row_stat(lse_ref[...]), _row_stat(delta_ref[...])

    def step(j, dq):
        k = k_ref[pl.ds(j * cfg.block_k, cfg.block_k), :]
        v = v_ref[pl.ds(j * cfg.block_k, cfg.block_k), :]
        _, ds = _probs_and_ds(q, k, v, do, lse, delta, i, j, cfg)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, _kv_end(i, cfg), step, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _backward(cfg: _Config, res, do):
    q, k, v, o, lse = res
    B, H, Nq, Dp = q.shape
    Hkv, Nk, G, lanes = k.shape[1], k.shape[2], cfg.group, cfg.lanes
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1, keepdims=True)  # D, (B, H, Nq, 1)
    delta = jnp.broadcast_to(delta, (B, H, Nq, lanes))                      # L's layout
    # dK, dV: one program per key block of one K/V head; it sees its group's G query heads.
    grp = cfg.resident((None, G, Nq, Dp), lambda b, hk, j: (b, hk, 0, 0))
    grp_row = cfg.resident((None, G, Nq, lanes), lambda b, hk, j: (b, hk, 0, 0))
    kv_blk = pl.BlockSpec((None, None, cfg.block_k, Dp), lambda b, hk, j: (b, hk, j, 0))
    dk, dv = cfg.call(
        _dkdv_kernel, grid=(B, Hkv, Nk // cfg.block_k),
        in_specs=[grp, grp, grp_row, grp_row, kv_blk, kv_blk], out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="flash_bwd_dkdv",
    )(q, do, lse, delta, k, v)
    # dQ: one program per query block, looping over key blocks, like the forward.
    q_blk = pl.BlockSpec((None, None, cfg.block_q, Dp), lambda b, h, i: (b, h, i, 0))
    row_blk = pl.BlockSpec((None, None, cfg.block_q, lanes), lambda b, h, i: (b, h, i, 0))
    kv_all = cfg.resident((None, None, Nk, Dp), lambda b, h, i: (b, _kv_head(h, G), 0, 0))
    dq = cfg.call(
        _dq_kernel, grid=(B, H, Nq // cfg.block_q),
        in_specs=[q_blk, q_blk, row_blk, row_blk, kv_all, kv_all], out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="flash_bwd_dq",
    )(q, do, lse, delta, k, v)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, cfg: _Config):
    return _forward(q, k, v, cfg)[0]


def _flash_fwd(q, k, v, cfg: _Config):
    o, lse = _forward(q, k, v, cfg)
    return o, (q, k, v, o, lse)      # residuals: no N² matrix


_flash.defvjp(_flash_fwd, _backward)

_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def _check_jax_inputs(q, k, v):
    # bf16 everywhere: JAX's interpret mode computes it correctly (tested against float64),
    # unlike Triton's interpreter, which the torch version must refuse it in.
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, jax.Array):
            raise TypeError(f"{name} must be a jax.Array, got {type(x).__name__}")
        if x.dtype not in _DTYPES:
            names = ", ".join(jnp.dtype(d).name for d in _DTYPES)
            raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")
    check_same_dtype(q, k, v)
    return attention_shape(q, k, v)


def flash_attention_pallas(q, k, v, *, causal: bool = False, sm_scale: float | None = None,
                           block_sizes: BlockSizes | None = None) -> jax.Array:
    """FlashAttention on JAX arrays; same arguments and layout as `flash_attention`.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, kv_heads, seq_k, head_dim); float16,
    bfloat16 or float32. Differentiable (jax.custom_vjp with Pallas backward kernels). Lowers
    for TPU (Mosaic) and GPU (Triton); the module docstring says how the layouts differ.
    """
    shape = _check_jax_inputs(q, k, v)
    blocks = block_sizes or BlockSizes()
    if not isinstance(blocks, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(blocks).__name__}")
    head_dim = padded_head_dim(shape.head_dim)
    target = pallas_target()
    check_gpu_blocks(target, block_m=blocks.block_m, block_n=blocks.block_n, head_dim=head_dim)
    cfg = _Config(shape.seq_q, shape.seq_k, shape.group, check_causal(causal),
                  softmax_scale(sm_scale, shape.head_dim), blocks.block_m, blocks.block_n,
                  pallas_interpret(), target)

    def pad(x, block):  # zero-pad seq to a multiple of `block`, head_dim to a power of two
        return jnp.pad(x, ((0, 0), (0, 0), (0, -x.shape[2] % block),
                           (0, head_dim - shape.head_dim)))

    o = _flash(pad(q, blocks.block_m), pad(k, blocks.block_n), pad(v, blocks.block_n), cfg)
    return o[:, :, : shape.seq_q, : shape.head_dim]
