"""The task bodies the persistent kernel dispatches to: one @triton.jit helper per op, inlined.

Every task works on all B ≤ BLOCK_B sequences at once (decode has one token per sequence), reads
float32 activations from the workspace WS, weights in their own dtype (fp32 or fp16), and writes
float32. Offsets arrive as int64 from the task table (kernels/megakernel/persistent_triton.py).
Matmul tiles are `tl.dot`s of [BLOCK_B, BLOCK_K] × [BLOCK_K, BLOCK_N] with the batch padded to
16 rows (tl.dot's minimum), as MPK pads decode batches to its MMA tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def embed_task(WS, W, TOK, a, batch, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[b, :] = E[token[b], :]; a = (E offset, x offset, dim)."""
    w_off, dst, dim = tl.load(a), tl.load(a + 1), tl.load(a + 2)
    rows = tl.arange(0, BLOCK_B)
    r_ok = rows < batch
    tok = tl.load(TOK + rows, mask=r_ok, other=0).to(tl.int64)
    for k0 in range(0, dim, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = r_ok[:, None] & (cols < dim)[None, :]
        e = tl.load(W + w_off + tok[:, None] * dim + cols[None, :], mask=m, other=0.0)
        tl.store(WS + dst + rows[:, None] * dim + cols[None, :], e.to(tl.float32), mask=m)


@triton.jit
def rmsnorm_task(WS, W, a, batch, eps, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """dst = src / sqrt(mean(src²) + eps) · w, rows of `dim`; a = (src, w, dst, dim)."""
    src, w_off, dst, dim = tl.load(a), tl.load(a + 1), tl.load(a + 2), tl.load(a + 3)
    rows = tl.arange(0, BLOCK_B)
    r_ok = rows < batch
    ss = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, dim, BLOCK_K):   # pass 1: Σ x² per row
        cols = k0 + tl.arange(0, BLOCK_K)
        m = r_ok[:, None] & (cols < dim)[None, :]
        x = tl.load(WS + src + rows[:, None] * dim + cols[None, :], mask=m, other=0.0)
        ss += tl.sum(x * x, 1)
    inv = 1.0 / tl.sqrt(ss / dim + eps)
    for k0 in range(0, dim, BLOCK_K):   # pass 2: scale (the row is re-read, not kept)
        cols = k0 + tl.arange(0, BLOCK_K)
        m = r_ok[:, None] & (cols < dim)[None, :]
        x = tl.load(WS + src + rows[:, None] * dim + cols[None, :], mask=m, other=0.0)
        w = tl.load(W + w_off + cols, mask=cols < dim, other=0.0).to(tl.float32)
        tl.store(WS + dst + rows[:, None] * dim + cols[None, :], x * inv[:, None] * w[None, :],
                 mask=m)


@triton.jit
def _tile_dot(WS, W, src, src_stride, k_dim, w_off, width, batch,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """src[:B, :K] @ W[w_off : w_off + width·K].view(width, K).T -> [BLOCK_B, BLOCK_N] fp32."""
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_N)
    r_ok, n_ok = rows < batch, cols < width
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        x = tl.load(WS + src + rows[:, None] * src_stride + ks[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + w_off + cols[:, None] * k_dim + ks[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
    return acc


@triton.jit
def matmul_task(WS, W, a, batch, SWIGLU: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dst[:, :width] = src @ W_tile.T, or silu(src @ Wg.T) · (src @ Wu.T) when SWIGLU;
    a = (src, src_stride, K, w, dst, dst_stride, width, w_up)."""
    src, src_stride, k_dim = tl.load(a), tl.load(a + 1), tl.load(a + 2)
    w_off, dst, dst_stride, width = tl.load(a + 3), tl.load(a + 4), tl.load(a + 5), tl.load(a + 6)
    acc = _tile_dot(WS, W, src, src_stride, k_dim, w_off, width, batch, BLOCK_B, BLOCK_N,
                    BLOCK_K)
    if SWIGLU:
        up = _tile_dot(WS, W, src, src_stride, k_dim, tl.load(a + 7), width, batch, BLOCK_B,
                       BLOCK_N, BLOCK_K)
        acc = acc / (1.0 + tl.exp(-acc)) * up
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_N)
    tl.store(WS + dst + rows[:, None] * dst_stride + cols[None, :], acc,
             mask=(rows < batch)[:, None] & (cols < width)[None, :])


@triton.jit
def _rotate(WS, off, n_rows, head_dim, COS, SIN, pos, BLOCK_G: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """n_rows heads at WS[off:], rotated "rotate half" style: pair (d, d + hd/2)."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    half = head_dim // 2
    m = (g < n_rows)[:, None] & (d < head_dim)[None, :]
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    x = tl.load(WS + off + g[:, None] * head_dim + d[None, :], mask=m, other=0.0)
    xp = tl.load(WS + off + g[:, None] * head_dim + partner[None, :], mask=m, other=0.0)
    cos = tl.load(COS + pos * head_dim + d, mask=d < head_dim, other=0.0)
    sin = tl.load(SIN + pos * head_dim + d, mask=d < head_dim, other=0.0)
    return x * cos[None, :] + sign[None, :] * xp * sin[None, :], m, g, d


@triton.jit
def rope_task(WS, KC, VC, COS, SIN, POS, a, head_dim,
              BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the group's q heads in place and k; append k, v at the sequence's position.
    a = (q, k, v, group, cache offset of [layer, b, kv head], b)."""
    q_off, k_off, v_off, group = tl.load(a), tl.load(a + 1), tl.load(a + 2), tl.load(a + 3)
    c_off, b = tl.load(a + 4), tl.load(a + 5)
    pos = tl.load(POS + b)
    q, m, g, d = _rotate(WS, q_off, group, head_dim, COS, SIN, pos, BLOCK_G, BLOCK_D)
    tl.store(WS + q_off + g[:, None] * head_dim + d[None, :], q, mask=m)
    k, mk, _, _ = _rotate(WS, k_off, 1, head_dim, COS, SIN, pos, BLOCK_G, BLOCK_D)
    slot = KC + c_off + pos * head_dim
    tl.store(slot + g[:, None] * head_dim + d[None, :], k.to(KC.dtype.element_ty), mask=mk)
    v = tl.load(WS + v_off + d, mask=d < head_dim, other=0.0)
    tl.store(VC + c_off + pos * head_dim + d, v.to(VC.dtype.element_ty), mask=d < head_dim)


@triton.jit
def attention_task(WS, KC, VC, POS, a, head_dim, sm_scale,
                   BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One KV head's query group over keys 0..pos (online softmax, base 2); a = (q, group,
    cache offset, dst, b). The group's heads are the rows of one tl.dot (GQA packing)."""
    q_off, group, c_off, dst, b = (tl.load(a), tl.load(a + 1), tl.load(a + 2), tl.load(a + 3),
                                   tl.load(a + 4))
    n_keys = tl.load(POS + b) + 1
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    s_idx = tl.arange(0, BLOCK_S)
    qm = (g < group)[:, None] & (d < head_dim)[None, :]
    q = tl.load(WS + q_off + g[:, None] * head_dim + d[None, :], mask=qm, other=0.0)
    q = (q * (sm_scale * 1.4426950408889634)).to(KC.dtype.element_ty)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(0, n_keys, BLOCK_S):
        keys = s0 + s_idx
        km = (keys < n_keys)[:, None] & (d < head_dim)[None, :]
        kv_at = c_off + keys[:, None] * head_dim + d[None, :]
        k = tl.load(KC + kv_at, mask=km, other=0.0)
        s = tl.dot(q, tl.trans(k))
        s = tl.where((keys < n_keys)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))   # finite: key s0 < n_keys is always visible
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VC + kv_at, mask=km, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(WS + dst + g[:, None] * head_dim + d[None, :], acc / l_i[:, None], mask=qm)


@triton.jit
def add_task(WS, a, batch, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """dst = x + y on a tile of `width` columns; a = (x, y, dst, stride, width)."""
    x_off, y_off, dst, stride, width = (tl.load(a), tl.load(a + 1), tl.load(a + 2),
                                        tl.load(a + 3), tl.load(a + 4))
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_N)
    m = (rows < batch)[:, None] & (cols < width)[None, :]
    at = rows[:, None] * stride + cols[None, :]
    x = tl.load(WS + x_off + at, mask=m, other=0.0)
    y = tl.load(WS + y_off + at, mask=m, other=0.0)
    tl.store(WS + dst + at, x + y, mask=m)


@triton.jit
def argmax_task(WS, OUT, a, batch, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """next[b] = argmax_v logits[b, v] (lowest index on ties, as torch.argmax); a = (logits,
    vocab)."""
    src, vocab = tl.load(a), tl.load(a + 1)
    rows = tl.arange(0, BLOCK_B)
    r_ok = rows < batch
    best = tl.full([BLOCK_B], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_B], tl.int64)   # vocab comes from the int64 table
    for v0 in range(0, vocab, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        m = r_ok[:, None] & (cols < vocab)[None, :]
        x = tl.load(WS + src + rows[:, None] * vocab + cols[None, :], mask=m,
                    other=float("-inf"))
        tile_max = tl.max(x, 1)
        first = tl.min(tl.where(x == tile_max[:, None], cols[None, :], vocab), 1)
        better = tile_max > best            # strictly: an earlier tile keeps its tie
        best_i = tl.where(better, first, best_i)
        best = tl.where(better, tile_max, best)
    tl.store(OUT + rows, best_i, mask=r_ok)
