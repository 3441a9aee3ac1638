"""A whole Llama decode step as one persistent Pallas kernel on TPU cores that wait on semaphores.

Triton's interpreter runs one program at a time, so there a worker can never wait for another.
Pallas's TPU interpret mode runs each core of a core mesh in its own thread
(`pltpu.InterpretParams(num_cores_or_threads=N)`) with simulated HBM, DMAs and semaphores, and
with `detect_races=True` checks every HBM access against the happens-before order the semaphores
create. So the worker loop of the Triton kernel runs here with workers that really block, over
the same task graph (shared.megakernel.graph.build_decode_graph): embedding, RMSNorms, QKV tiles,
RoPE and attention per (sequence, KV head), output-projection tiles, residual tiles that wait for
their own matmul tile, SwiGLU and down tiles, lm-head tiles and the greedy argmax.

Worker c walks QUEUE[c, :QLEN[c]]; per task it
1. waits: `semaphore_wait(sem[e], need)` on its own core's counter for event e (waits decrement:
   each consuming task takes its `need` signals);
2. runs the op: DMA its inputs HBM → VMEM, compute in float32, DMA the result VMEM → HBM and wait
   for that DMA (so the write has landed before anyone is told);
3. triggers: one `semaphore_signal(sem[e], 1, core_index=c')` per consuming task of e, to the
   core c' that task is queued on (SIG_* tables), so every counter ends the step at zero.

Tables (int32, copied to SMEM): OP and ARG [tasks, 4] = (layer or norm index, column, sequence b,
KV head h); WAIT, NEED; QUEUE [cores, L]; QLEN; SIG_START [tasks + 1], SIG_EVENT, SIG_CORE; TOK and
POS [B] (this step's tokens and positions). Weights are stacked per kind across layers and stored
input-major ([L, K, N]), so a task's tile is a column block `w.at[layer, :, pl.ds(col, tile)]`.
The KV caches are JAX Refs, aliased in and out: the RoPE tasks write position POS[b] in place.

Every matmul tile reads its whole K: at the tiny Llama's sizes (K ≤ 384) that is a few KiB of
VMEM; kernels/megakernel/compile_cases.py lowers it at Qwen3-8B's widths too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.device import pallas_interpret
from kernels.tpu_lowering import require_tpu

OPS = {"embed": 0, "rmsnorm": 1, "qkv": 2, "o_proj": 3, "swiglu": 4, "down_proj": 5,
       "lm_head": 6, "rope": 7, "attention": 8, "add_o": 9, "add_down": 10, "argmax": 11}
TABLES = ("OP", "ARG", "WAIT", "NEED", "QUEUE", "QLEN", "SIG_START", "SIG_EVENT", "SIG_CORE",
          "TOK", "POS")
WEIGHTS = ("embed", "norms", "wqkv", "wo", "w_gate", "w_up", "w_down", "lm_head", "cos",
           "sin_signed")
ACTS = ("x", "xn", "qkv", "attn", "o", "act", "down", "logits")


def _kernel(*refs, dims: dict, eps: float):
    nt, nw, na = len(TABLES), len(WEIGHTS), len(ACTS)
    tables = refs[:nt]
    w = dict(zip(WEIGHTS, refs[nt:nt + nw], strict=True))
    kc, vc = refs[nt + nw:nt + nw + 2]
    outs = refs[nt + nw + 2:nt + nw + 2 + na + 1]
    a = dict(zip(ACTS, outs[:na], strict=True))
    next_tokens = outs[na]
    smem = refs[nt + nw + 2 + na + 1:2 * nt + nw + 2 + na + 1]
    (rows_v, wide_v, w_v, w2_v, tile_v, tile2_v, head_v, kv_v, norm_v, cs_v, tok_v, ids_v,
     dma, sems) = refs[2 * nt + nw + 2 + na + 1:]
    op_t, arg_t, wait_t, need_t, queue_t, qlen_t, sig0_t, sige_t, sigc_t, tok_t, pos_t = smem
    B, D, F, V = dims["B"], dims["D"], dims["F"], dims["V"]
    hd, group, tile, S = dims["head_dim"], dims["group"], dims["tile"], dims["S"]
    half, f32 = hd // 2, jnp.float32
    core = jax.lax.axis_index("core")   # the core this worker runs on: signals address it

    def copy(src, dst):
        c = pltpu.make_async_copy(src, dst, dma)
        c.start()
        c.wait()

    for src, dst in zip(tables, smem, strict=True):   # the schedule, into scalar memory
        copy(src, dst)

    def tile_matmul(src, k, weight, dst, layer, col, swiglu=None):
        """dst[:, col:col+tile] = src[:, :k] @ weight[layer][:, col:col+tile] (or SwiGLU of two)."""
        cols = pl.ds(col, tile)
        copy(src, wide_v.at[:, :k])
        copy(weight.at[layer, :, cols], w_v.at[:k])
        x = wide_v[:, :k]
        acc = jnp.dot(x.astype(w_v.dtype), w_v[:k], preferred_element_type=f32)
        if swiglu is not None:
            copy(swiglu.at[layer, :, cols], w2_v.at[:k])
            up = jnp.dot(x.astype(w2_v.dtype), w2_v[:k], preferred_element_type=f32)
            acc = acc * jax.nn.sigmoid(acc) * up
        tile_v[...] = acc
        copy(tile_v, dst.at[:, cols])

    def rotate(x, cos, sin_signed):
        """Rotate-half RoPE on rows of head_dim lanes: a roll by hd/2 swaps the halves either
        way round, and sin_signed carries the sign of the half that is negated."""
        return x * cos + pltpu.roll(x, half, 1) * sin_signed

    def run_task(i, carry):
        t = queue_t[core, i]
        ev = wait_t[t]

        @pl.when(ev >= 0)
        def _():
            pl.semaphore_wait(sems.at[ev], need_t[t])

        op, layer = op_t[t], arg_t[t, 0]
        col = pl.multiple_of(arg_t[t, 1], tile)
        b, h = arg_t[t, 2], arg_t[t, 3]
        pos = pos_t[b]

        @pl.when(op == OPS["embed"])                        # x[b] = E[token[b]]
        def _():
            for r in range(B):
                copy(w["embed"].at[pl.ds(tok_t[r], 1)], tok_v.at[pl.ds(r, 1)])
            rows_v[...] = tok_v[...].astype(f32)
            copy(rows_v, a["x"])

        @pl.when(op == OPS["rmsnorm"])                      # xn = x / rms(x) · w[layer]
        def _():
            copy(a["x"], rows_v)
            copy(w["norms"].at[layer], norm_v)
            v = rows_v[...]
            inv = jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)
            rows_v[...] = v * inv * norm_v[...].astype(f32)
            copy(rows_v, a["xn"])

        for name, src, k, weight, dst in (("qkv", "xn", D, "wqkv", "qkv"),
                                          ("o_proj", "attn", D, "wo", "o"),
                                          ("down_proj", "act", F, "w_down", "down"),
                                          ("lm_head", "xn", D, "lm_head", "logits")):
            @pl.when(op == OPS[name])
            def _(src=src, k=k, weight=weight, dst=dst):
                tile_matmul(a[src], k, w[weight], a[dst], layer, col)

        @pl.when(op == OPS["swiglu"])                       # act tile = silu(xn Wg) · xn Wu
        def _():
            tile_matmul(a["xn"], D, w["w_gate"], a["act"], layer, col, swiglu=w["w_up"])

        q0 = h * group * hd                                 # this KV head's query group in qkv
        k_at = dims["H"] * hd + h * hd
        v_at = k_at + dims["Hkv"] * hd

        @pl.when(op == OPS["rope"])       # rotate q in place; k, v into the cache at pos
        def _():
            copy(w["cos"].at[pl.ds(pos, 1)], cs_v.at[pl.ds(0, 1)])
            copy(w["sin_signed"].at[pl.ds(pos, 1)], cs_v.at[pl.ds(1, 1)])
            cos, sin = cs_v[0:1], cs_v[1:2]
            for g in range(group):
                copy(a["qkv"].at[pl.ds(b, 1), pl.ds(q0 + g * hd, hd)], head_v.at[pl.ds(g, 1)])
            head_v[...] = rotate(head_v[...], cos, sin)
            for g in range(group):
                copy(head_v.at[pl.ds(g, 1)], a["qkv"].at[pl.ds(b, 1), pl.ds(q0 + g * hd, hd)])
            for cache, at, rot in ((kc, k_at, True), (vc, v_at, False)):
                copy(a["qkv"].at[pl.ds(b, 1), pl.ds(at, hd)], head_v.at[pl.ds(0, 1)])
                row = head_v[0:1]
                kv_v[0:1] = (rotate(row, cos, sin) if rot else row).astype(kv_v.dtype)
                copy(kv_v.at[pl.ds(0, 1)], cache.at[layer, b, h, pl.ds(pos, 1)])

        @pl.when(op == OPS["attention"])   # the group's heads over keys 0..pos, in one dot
        def _():
            for g in range(group):
                copy(a["qkv"].at[pl.ds(b, 1), pl.ds(q0 + g * hd, hd)], head_v.at[pl.ds(g, 1)])
            keys = jax.lax.broadcasted_iota(jnp.int32, (S, 1), 0)
            copy(kc.at[layer, b, h], kv_v)
            k = jnp.where(keys <= pos, kv_v[...].astype(f32), 0.0)
            q = head_v[...] * dims["sm_scale"]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32)
            s = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (group, S), 1) <= pos, s, -jnp.inf)
            p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
            copy(vc.at[layer, b, h], kv_v)           # rows past pos may be stale: zero them
            v = jnp.where(keys <= pos, kv_v[...].astype(f32), 0.0)
            head_v[...] = jnp.dot(p, v, preferred_element_type=f32) / jnp.sum(p, axis=1,
                                                                              keepdims=True)
            for g in range(group):
                copy(head_v.at[pl.ds(g, 1)], a["attn"].at[pl.ds(b, 1), pl.ds(q0 + g * hd, hd)])

        for name, other in (("add_o", "o"), ("add_down", "down")):
            @pl.when(op == OPS[name])                       # x[:, tile] += other[:, tile]
            def _(other=other):
                cols = pl.ds(col, tile)
                copy(a["x"].at[:, cols], tile_v)
                copy(a[other].at[:, cols], tile2_v)
                tile_v[...] = tile_v[...] + tile2_v[...]
                copy(tile_v, a["x"].at[:, cols])

        @pl.when(op == OPS["argmax"])     # greedy next token: the first maximum, as torch's
        def _():
            def chunk(j, carry):          # tile by tile: a 152k vocabulary never sits in VMEM
                best, best_at = carry
                c0 = pl.multiple_of(j * tile, tile)
                copy(a["logits"].at[:, pl.ds(c0, tile)], tile_v)
                idx = c0 + jax.lax.broadcasted_iota(jnp.int32, (B, tile), 1)
                x = jnp.where(idx < V, tile_v[...], -jnp.inf)   # padded vocabulary columns
                top = jnp.max(x, axis=1, keepdims=True)
                first = jnp.min(jnp.where(x == top, idx, dims["Vp"]), axis=1, keepdims=True)
                better = top > best                # strictly: an earlier tile keeps its tie
                return jnp.where(better, top, best), jnp.where(better, first, best_at)

            _, ids_v[...] = jax.lax.fori_loop(
                0, dims["Vp"] // tile, chunk,
                (jnp.full((B, 1), -jnp.inf, f32), jnp.zeros((B, 1), jnp.int32)))
            copy(ids_v, next_tokens)

        def signal(j, c):
            pl.semaphore_signal(sems.at[sige_t[j]], 1, core_index=sigc_t[j])
            return c

        jax.lax.fori_loop(sig0_t[t], sig0_t[t + 1], signal, 0)
        return carry

    jax.lax.fori_loop(0, qlen_t[core], run_task, 0)


def decode_step_pallas(tables: dict, weights: dict, k_cache, v_cache, *, dims: dict,
                       cores: int, n_events: int, eps: float, interpret=None):
    """One persistent launch of `cores` workers over a decode step's task tables.

    `weights`: WEIGHTS (see the module doc; `norms` [2L + 1, 1, D], `lm_head` [1, D, Vp] with the
    vocabulary padded to whole tiles); `k_cache`, `v_cache`: jax Refs [L, B, Hkv, S, hd], written
    in place at POS. `dims`: B, D, F, V, Vp, H, Hkv, head_dim, group, tile, S, sm_scale.
    Returns the step's activations (ACTS) and the next tokens [B, 1] int32."""
    require_tpu("decode_step_pallas", "kernels.megakernel.persistent_triton")
    B, D, F, Vp = dims["B"], dims["D"], dims["F"], dims["Vp"]
    hd, group, tile, S = dims["head_dim"], dims["group"], dims["tile"], dims["S"]
    f32, wdt, cdt = jnp.float32, weights["wqkv"].dtype, k_cache.dtype
    n_qkv = (dims["H"] + 2 * dims["Hkv"]) * hd
    widths = {"x": D, "xn": D, "qkv": n_qkv, "attn": D, "o": D, "act": F, "down": D,
              "logits": Vp}
    out_type = [jax.ShapeDtypeStruct((B, widths[k]), f32) for k in ACTS] + \
        [jax.ShapeDtypeStruct((B, 1), jnp.int32)]
    k_max = max(D, F)
    scratch = [*(pltpu.SMEM(tables[k].shape, jnp.int32) for k in TABLES),
               pltpu.VMEM((B, D), f32),                # rows_v: x or xn, whole rows
               pltpu.VMEM((B, k_max), f32),            # wide_v: a matmul's whole input
               pltpu.VMEM((k_max, tile), wdt), pltpu.VMEM((k_max, tile), wdt),   # weight tiles
               pltpu.VMEM((B, tile), f32), pltpu.VMEM((B, tile), f32),
               pltpu.VMEM((group, hd), f32),           # head_v: a query group's heads
               pltpu.VMEM((S, hd), cdt),               # kv_v: one head's keys or values
               pltpu.VMEM((1, D), weights["norms"].dtype), pltpu.VMEM((2, hd), f32),
               pltpu.VMEM((B, D), weights["embed"].dtype), pltpu.VMEM((B, 1), jnp.int32),
               pltpu.SemaphoreType.DMA(()), pltpu.SemaphoreType.REGULAR((n_events,))]
    run = pl.kernel(functools.partial(_kernel, dims=dims, eps=eps), out_type,
                    mesh=pltpu.create_tensorcore_mesh("core", num_cores=cores),
                    scratch_types=scratch,
                    interpret=pallas_interpret() if interpret is None else interpret)
    outs = run(*(tables[k] for k in TABLES), *(weights[k] for k in WEIGHTS), k_cache, v_cache)
    return dict(zip(ACTS, outs[:len(ACTS)], strict=True)), outs[len(ACTS)]
