"""Paged decode attention in Pallas (TPU layout), the twin of paged_attention_triton.py.

The same split-K algorithm in Pallas's terms. The grid is (batch, split, page): the block table
and seq_lens are *scalar-prefetched* into SMEM, so the K/V BlockSpecs' index maps read them and
the pipeline DMAs exactly one physical cache block per grid step, block_tables[b, page]: the
gather happens in the copy engine, as in JAX's own TPU paged attention. Differences from the
Triton kernel, on purpose:
- A program holds every KV head of its sequence. A TPU block's last two dims must be multiples
  of (8, 128) or the whole array dims; the cache is (num_blocks, block_size, kv_heads, head_dim),
  so (kv_heads, head_dim) is taken whole and the heads are a static loop. GQA packing is kept:
  the `group` query heads of KV head h are the rows of one dot with that head's K.
- Splits cut the *table* (pages_per_split pages each), not each sequence's length: a grid is
  static. Pages past a sequence's end re-point at its last block (no new DMA) and are skipped.
- The running (m, l) are VMEM scratch, lane-dense (heads, 128), and accumulate across the page
  axis, which is "arbitrary" (in order, one core); batch and split are "parallel": each program
  writes only its own output block, so parallel steps never touch the same memory (checked
  under pltpu.InterpretParams(detect_races=True) in the tests).
- Stage 2, the log-sum-exp merge, is a few fused XLA ops on (batch, splits, heads, ·) rather
  than a kernel: it reads num_splits · head_dim floats per head, nothing next to the cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.device import pallas_interpret
from kernels.paged._args import check_splits, paged_shape, softmax_scale
from kernels.tpu_lowering import compiler_params, require_tpu

F32 = jnp.float32
LANES = 128   # per-head statistics kept lane-dense on a TPU


@dataclass(frozen=True)
class _Config:
    kv_heads: int
    group: int
    block_size: int
    num_blocks: int
    pages_per_split: int
    sm_scale: float


def _page(b, s, p, tables, lens, cfg: _Config):
    """Physical block of grid step (b, s, p): past the sequence's end, its last block again (the
    pipeline skips a copy whose index did not change), clamped into the cache for length 0."""
    n_pages = lax.div(lens[b] + (cfg.block_size - 1), cfg.block_size)
    logical = jnp.minimum(s * cfg.pages_per_split + p, jnp.maximum(n_pages - 1, 0))
    return jnp.clip(tables[b, logical], 0, cfg.num_blocks - 1), 0, 0, 0


def _kernel(tables, lens, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, acc_s, m_s, l_s, *,
            cfg: _Config):
    # q_ref: (Hq, D) of sequence b; k_ref, v_ref: (block_size, Hkv, D), one physical block;
    # outputs and scratch: (Hq, D) and (Hq, LANES) for this (b, split).
    b, s, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = (s * cfg.pages_per_split + p) * cfg.block_size

    @pl.when(p == 0)
    def _init():
        acc_s[...] = jnp.zeros(acc_s.shape, F32)
        m_s[...] = jnp.full(m_s.shape, -jnp.inf, F32)
        l_s[...] = jnp.zeros(l_s.shape, F32)

    @pl.when(start < lens[b])
    def _step():   # online softmax over one page (FA2 §3.1.1), one KV head at a time
        tokens = start + lax.broadcasted_iota(jnp.int32, (1, cfg.block_size), 1)
        valid = tokens < lens[b]                                   # (1, block_size)
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        for h in range(cfg.kv_heads):
            rows = slice(h * cfg.group, (h + 1) * cfg.group)       # GQA: one dot per group
            kh = k[:, h, :]
            # Slots past seq_len may hold anything (NaN in the tests): mask s and zero v.
            vh = jnp.where(valid.T, v[:, h, :], 0).astype(v.dtype)
            sc = jnp.dot(q[rows], kh.T, preferred_element_type=F32) * cfg.sm_scale
            sc = jnp.where(valid, sc, -jnp.inf)                    # (group, block_size)
            m_old, l_old = m_s[rows, :][:, :1], l_s[rows, :][:, :1]
            m_new = jnp.maximum(m_old, sc.max(axis=1, keepdims=True))   # finite: a valid slot
            alpha = jnp.exp(m_old - m_new)
            pr = jnp.exp(sc - m_new)
            acc_s[rows, :] = acc_s[rows, :] * alpha + jnp.dot(
                pr.astype(vh.dtype), vh, preferred_element_type=F32)
            m_s[rows, :] = jnp.broadcast_to(m_new, (cfg.group, LANES))
            l_s[rows, :] = jnp.broadcast_to(l_old * alpha + pr.sum(axis=1, keepdims=True),
                                            (cfg.group, LANES))

    @pl.when(p == cfg.pages_per_split - 1)
    def _store():   # an empty split stores acc = 0, m = −inf, l = 0
        acc_ref[...] = acc_s[...]
        m_ref[...] = m_s[...]
        l_ref[...] = l_s[...]


def merge(acc, m, l_):
    """Stage 2: acc (B, S, Hq, D), m and l (B, S, Hq) -> (B, Hq, D) by log-sum-exp."""
    m_max = m.max(axis=1, keepdims=True)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)             # all splits empty: weights 0
    w = jnp.exp(m - m_max)                                        # (B, S, Hq)
    num = (acc * w[..., None]).sum(axis=1)
    den = (l_ * w).sum(axis=1)
    return num / jnp.where(den == 0.0, 1.0, den)[..., None]


def paged_attention_pallas(q, k_cache, v_cache, block_tables, seq_lens, *, sm_scale=None,
                           num_splits=None, interpret=None):
    """paged_attention on JAX arrays (same arguments and layout as the Triton version).

    num_splits=None takes one split per 8 pages of the table, at most 8 (on a TPU the grid steps
    of one core run in order, so splits buy parallelism only across cores or a megacore).
    interpret: None (interpret on a CPU), a bool, or a pltpu.InterpretParams (race detection).
    The table's values are not checked here (jit-traced): paged_attention_reference checks them.
    """
    shape = paged_shape(q, k_cache, v_cache, block_tables, seq_lens)
    check_splits(num_splits)
    require_tpu("paged_attention_pallas", "kernels.paged.paged_attention")
    splits = num_splits or max(1, min(8, shape.max_blocks // 8))
    per_split = -(-shape.max_blocks // splits)
    cfg = _Config(shape.kv_heads, shape.group, shape.block_size, shape.num_blocks, per_split,
                  softmax_scale(sm_scale, shape.head_dim))
    return _call(q, k_cache, v_cache, block_tables, seq_lens, cfg=cfg, splits=splits,
                 interpret=pallas_interpret() if interpret is None else interpret)


@functools.partial(jax.jit, static_argnames=("cfg", "splits", "interpret"))
def _call(q, k_cache, v_cache, block_tables, seq_lens, *, cfg: _Config, splits: int,
          interpret):
    batch, heads, head_dim = q.shape
    page = functools.partial(_page, cfg=cfg)
    cache_spec = pl.BlockSpec((None, cfg.block_size, cfg.kv_heads, head_dim), page)
    part = lambda b, s, p, tables, lens: (b, s, 0, 0)   # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, splits, cfg.pages_per_split),
        in_specs=[pl.BlockSpec((None, heads, head_dim), lambda b, s, p, tables, lens: (b, 0, 0)),
                  cache_spec, cache_spec],
        out_specs=[pl.BlockSpec((None, None, heads, head_dim), part),
                   pl.BlockSpec((None, None, heads, LANES), part),
                   pl.BlockSpec((None, None, heads, LANES), part)],
        scratch_shapes=[pltpu.VMEM((heads, head_dim), F32), pltpu.VMEM((heads, LANES), F32),
                        pltpu.VMEM((heads, LANES), F32)],
    )
    acc, m, l_ = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((batch, splits, heads, head_dim), F32),
                   jax.ShapeDtypeStruct((batch, splits, heads, LANES), F32),
                   jax.ShapeDtypeStruct((batch, splits, heads, LANES), F32)],
        compiler_params=compiler_params("tpu", ("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(block_tables, seq_lens, q, k_cache, v_cache)
    return merge(acc, m[..., 0], l_[..., 0]).astype(q.dtype)
