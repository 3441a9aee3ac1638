"""The task bodies the persistent kernel dispatches to: one @triton.jit helper per op, inlined.

Every task works on all B ≤ BLOCK_B sequences at once (decode has one token per sequence), reads
float32 activations from the workspace WS, weights in their own dtype (fp32 or fp16), and writes
float32. Offsets arrive as int64 from the task table (kernels/megakernel/persistent_triton.py).
Matmul tiles are `tl.dot`s of [BLOCK_B, BLOCK_K] × [BLOCK_K, BLOCK_N] with the batch padded to
16 rows (tl.dot's minimum), as MPK pads decode batches to its MMA tiles: masked rows cost MMA
issue slots, never bytes.

At decode a task is a weight stream, so what sets its speed is the bytes it keeps in flight
(Little's law). One SM's share of an H200's ~4.2 TB/s at ~1 µs loaded latency is ~32 KB in
flight. The weight loop is `tl.range(..., num_stages=STAGES)`: Triton's pipeliner keeps
STAGES − 1 cp.async tiles outstanding while the MMA eats the oldest; a [128, 64] 16-bit tile
is 16 KB, so 5 stages keep 64 KB in flight. cp.async moves 4, 8 or 16 bytes, so the weight
offsets are declared tl.multiple_of (the runtime checks them) and Wᵀ is addressed directly:
without the hints each 16-bit weight load was a 2-byte scalar load, and a tl.trans'ed tile
stayed in registers, so the loop ran synchronously with one [64, 64] tile (8 KB) per round
trip, under a quarter of Little's law. A SwiGLU task streams gate and up
in one loop (one pipeline fill, x read once). Row-wise bodies (embed, RMSNorm, argmax) walk one
row at a time BLOCK_R columns a step: at [16, 64] a step, the argmax over Qwen3's vocabulary
was 2 374 dependent steps and each RMSNorm 128, all on the step's critical path.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def embed_task(WS, W, TOK, a, batch, BLOCK_R: tl.constexpr):
    """x[b, :] = E[token[b], :]; a = (E offset, x offset, dim)."""
    w_off, dst, dim = tl.load(a), tl.load(a + 1), tl.load(a + 2)
    for b in range(0, batch):
        tok = tl.load(TOK + b).to(tl.int64)
        for k0 in range(0, dim, BLOCK_R):
            cols = k0 + tl.arange(0, BLOCK_R)
            e = tl.load(W + w_off + tok * dim + cols, mask=cols < dim, other=0.0)
            tl.store(WS + dst + b * dim + cols, e.to(tl.float32), mask=cols < dim)


@triton.jit
def rmsnorm_task(WS, W, a, batch, eps, BLOCK_R: tl.constexpr):
    """dst = src / sqrt(mean(src²) + eps) · w, row by row; a = (src, w, dst, dim). A row of
    dim ≤ BLOCK_R is read once and kept: one round trip on the step's critical path. Wider
    rows (Qwen3's 4096 at BLOCK_R 2048: a 4096-wide row spilled on sm_90) take two passes of
    dim / BLOCK_R steps, the second re-reading from L2."""
    src, w_off, dst, dim = tl.load(a), tl.load(a + 1), tl.load(a + 2), tl.load(a + 3)
    cols = tl.arange(0, BLOCK_R)
    for b in range(0, batch):
        row, out = WS + src + b * dim, WS + dst + b * dim
        if dim <= BLOCK_R:
            m = cols < dim
            x = tl.load(row + cols, mask=m, other=0.0)
            w = tl.load(W + w_off + cols, mask=m, other=0.0).to(tl.float32)
            inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / dim + eps)
            tl.store(out + cols, x * inv * w, mask=m)
        else:
            ss = tl.zeros([BLOCK_R], tl.float32)
            for k0 in range(0, dim, BLOCK_R):
                x = tl.load(row + k0 + cols, mask=k0 + cols < dim, other=0.0)
                ss += x * x
            inv = 1.0 / tl.sqrt(tl.sum(ss, 0) / dim + eps)
            for k0 in range(0, dim, BLOCK_R):
                m = k0 + cols < dim
                x = tl.load(row + k0 + cols, mask=m, other=0.0)
                w = tl.load(W + w_off + k0 + cols, mask=m, other=0.0).to(tl.float32)
                tl.store(out + k0 + cols, x * inv * w, mask=m)


@triton.jit
def _tile_dot(WS, W, src, src_stride, k_dim, w_off, w2_off, width, batch, TWO: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              STAGES: tl.constexpr):
    """src[:B, :K] @ W[w_off : w_off + width·K].view(width, K).T -> [BLOCK_B, BLOCK_N] fp32,
    and the same product with the tile at w2_off when TWO (gate and up in one stream)."""
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_N)
    r_ok, n_ok = rows < batch, cols < width
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for k0 in tl.range(0, k_dim, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        x = tl.load(WS + src + rows[:, None] * src_stride + ks[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        # Wᵀ's [BLOCK_K, BLOCK_N] tile addressed directly (K contiguous): loaded as W's tile
        # and tl.trans'ed, the load went to registers and the pipeliner left it synchronous.
        w_at = ks[:, None] + cols[None, :] * k_dim
        w_ok = k_ok[:, None] & n_ok[None, :]
        w = tl.load(W + w_off + w_at, mask=w_ok, other=0.0)
        x = x.to(w.dtype)
        acc = tl.dot(x, w, acc)
        if TWO:
            w2 = tl.load(W + w2_off + w_at, mask=w_ok, other=0.0)
            acc2 = tl.dot(x, w2, acc2)
    return acc, acc2


@triton.jit
def matmul_task(WS, W, a, batch, SWIGLU: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """dst[:, :width] = src @ W_tile.T, or silu(src @ Wg.T) · (src @ Wu.T) when SWIGLU;
    a = (src, src_stride, K, w, dst, dst_stride, width, w_up). SwiGLU streams two tiles per
    step, so it steps BLOCK_K / 2: the same bytes per stage, the same shared memory."""
    # Alignment the runtime checks (runtime.check_alignment): without it every 16-bit weight
    # load is a 2-byte scalar load and cp.async (4 bytes or more) cannot stage it.
    src, src_stride = tl.multiple_of(tl.load(a), 4), tl.multiple_of(tl.load(a + 1), 4)
    k_dim, w_off = tl.multiple_of(tl.load(a + 2), 8), tl.multiple_of(tl.load(a + 3), 8)
    dst, dst_stride, width = tl.load(a + 4), tl.load(a + 5), tl.load(a + 6)
    if SWIGLU:
        w_up = tl.multiple_of(tl.load(a + 7), 8)
        gate, up = _tile_dot(WS, W, src, src_stride, k_dim, w_off, w_up, width, batch,
                             True, BLOCK_B, BLOCK_N, BLOCK_K // 2, STAGES)
        acc = gate / (1.0 + tl.exp(-gate)) * up
    else:
        acc, _ = _tile_dot(WS, W, src, src_stride, k_dim, w_off, w_off, width, batch, False,
                           BLOCK_B, BLOCK_N, BLOCK_K, STAGES)
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
def attention_task(WS, KC, VC, POS, a, head_dim, sm_scale, BLOCK_G: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    """One KV head's query group over keys 0..pos (online softmax, base 2); a = (q, group,
    cache offset, dst, b). The group's heads are the rows of one tl.dot (GQA packing). The
    key loop keeps STAGES − 1 K and V tiles in flight (at d = 128 and 32 keys, 16 KB a stage):
    one task streams a whole (sequence, KV head) cache, 256 KB at 512 keys, 2 MB at 4k."""
    q_off, group, dst, b = tl.load(a), tl.load(a + 1), tl.load(a + 3), tl.load(a + 4)
    c_off = tl.multiple_of(tl.load(a + 2), 8)   # a multiple of head_dim (checked: of 8)
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
    for s0 in tl.range(0, n_keys, BLOCK_S, num_stages=STAGES):
        keys = s0 + s_idx
        km = (keys < n_keys)[:, None] & (d < head_dim)[None, :]
        kv_at = c_off + keys[:, None] * head_dim + d[None, :]
        # Kᵀ addressed directly, as the weights in _tile_dot: tl.trans of a loaded K kept the
        # load out of the pipeline
        k_t = tl.load(KC + c_off + keys[None, :] * head_dim + d[:, None],
                      mask=(d < head_dim)[:, None] & (keys < n_keys)[None, :], other=0.0)
        s = tl.dot(q, k_t)
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
def argmax_task(WS, OUT, a, batch, BLOCK_R: tl.constexpr):
    """next[b] = argmax_v logits[b, v] (lowest index on ties, as torch.argmax); a = (logits,
    vocab). Row by row, BLOCK_R logits a step, the next step's load issued before this step's
    reduction: 75 steps for Qwen3's 151 936-token row at 2048 wide."""
    src = tl.load(a)
    vocab = tl.load(a + 1).to(tl.int32)   # int32 column indices: int64 ones spilled on sm_90
    offs = tl.arange(0, BLOCK_R)
    for b in range(0, batch):
        row = WS + src + b * vocab
        best = float("-inf")
        best_i = tl.zeros([], tl.int32)
        x = tl.load(row + offs, mask=offs < vocab, other=float("-inf"))
        for v0 in range(0, vocab, BLOCK_R):
            nxt = v0 + BLOCK_R + offs
            x_next = tl.load(row + nxt, mask=nxt < vocab, other=float("-inf"))
            cols = v0 + offs
            tile_max = tl.max(x, 0)
            first = tl.min(tl.where(x == tile_max, cols, vocab), 0)
            better = tile_max > best        # strictly: an earlier tile keeps its tie
            best_i = tl.where(better, first, best_i)
            best = tl.where(better, tile_max, best)
            x = x_next
        tl.store(OUT + b, best_i.to(tl.int64))
