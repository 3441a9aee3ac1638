"""The persistent worker loop in Pallas on TPU semaphores: several cores, real waiting.

Triton's interpreter runs one program at a time, so there a worker can never wait for another.
Pallas's TPU interpret mode runs each core of a `parallel` grid axis in its own thread
(`pltpu.InterpretParams(num_cores_or_threads=N)`) with simulated HBM, DMAs and semaphores, and
with `detect_races=True` checks every HBM access against the happens-before order the semaphores
create. So the same worker loop as the Triton kernel runs here with workers that really block.

Scope: the MLP half of a decode layer as a task graph (shared.megakernel.graph.build_mlp_graph):
RMSNorm, SwiGLU tiles (gate and up), down-projection tiles, and residual tiles that each wait
for their own down tile. Worker c walks QUEUE[c, :QLEN[c]]; per task it
1. waits: `semaphore_wait(sem[e], need)` on its own core's counter for event e (it decrements:
   each consuming task takes its `need` signals);
2. runs the op: DMA its inputs HBM → VMEM, compute, DMA the tile VMEM → HBM, wait for the DMA;
3. triggers: one `semaphore_signal(sem[e], 1, core_index=c')` per consuming task of e, to the
   core c' that task is queued on (SIG_* tables), so every counter ends the step at zero.

Tables (int32, scalar-prefetched to SMEM): OP, COL, WAIT, NEED per task; QUEUE [cores, L]; QLEN;
SIG_START [tasks + 1], SIG_EVENT, SIG_CORE. OP: 0 rmsnorm, 1 swiglu, 2 down, 3 add.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.device import pallas_interpret
from kernels.tpu_lowering import require_tpu

OPS = {"rmsnorm": 0, "swiglu": 1, "down": 2, "add": 3}
TABLES = ("OP", "COL", "WAIT", "NEED", "QUEUE", "QLEN", "SIG_START", "SIG_EVENT", "SIG_CORE")


def _kernel(*refs, tile: int, eps: float):
    n = len(TABLES)
    tables_hbm, (x, wn, wg, wu, wd), (xn, act, down, out) = refs[:n], refs[n:n + 5], \
        refs[n + 5:n + 9]
    smem, (xv, xnv, actv, wnv, wgv, wuv, wdv, tile_v, tile2_v, dma, sems) = \
        refs[n + 9:2 * n + 9], refs[2 * n + 9:]
    core = jax.lax.axis_index("core")   # the core this worker runs on: signals address it

    def copy(src, dst):
        c = pltpu.make_async_copy(src, dst, dma)
        c.start()
        c.wait()

    for src, dst in zip(tables_hbm, smem, strict=True):   # the schedule, into scalar memory
        copy(src, dst)
    op_t, col_t, wait_t, need_t, queue_t, qlen_t, sig0_t, sige_t, sigc_t = smem

    def run_task(i, carry):
        t = queue_t[core, i]
        ev = wait_t[t]

        @pl.when(ev >= 0)
        def _():
            pl.semaphore_wait(sems.at[ev], need_t[t])

        col = pl.multiple_of(col_t[t] * tile, tile)
        op = op_t[t]

        @pl.when(op == 0)                                   # xn = rmsnorm(x) · w
        def _():
            copy(x, xv)
            copy(wn, wnv)
            v = xv[...]
            inv = jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)
            xnv[...] = v * inv * wnv[...]
            copy(xnv, xn)

        @pl.when(op == 1)                                   # act[:, tile] = silu(xn Wg) · xn Wu
        def _():
            copy(xn, xnv)
            copy(wg.at[:, pl.ds(col, tile)], wgv)
            copy(wu.at[:, pl.ds(col, tile)], wuv)
            g = jnp.dot(xnv[...], wgv[...], preferred_element_type=jnp.float32)
            u = jnp.dot(xnv[...], wuv[...], preferred_element_type=jnp.float32)
            tile_v[...] = g * jax.nn.sigmoid(g) * u
            copy(tile_v, act.at[:, pl.ds(col, tile)])

        @pl.when(op == 2)                                   # down[:, tile] = act Wd
        def _():
            copy(act, actv)
            copy(wd.at[:, pl.ds(col, tile)], wdv)
            tile_v[...] = jnp.dot(actv[...], wdv[...], preferred_element_type=jnp.float32)
            copy(tile_v, down.at[:, pl.ds(col, tile)])

        @pl.when(op == 3)                                   # out[:, tile] = x + down
        def _():
            copy(x.at[:, pl.ds(col, tile)], tile_v)
            copy(down.at[:, pl.ds(col, tile)], tile2_v)
            tile_v[...] = tile_v[...] + tile2_v[...]
            copy(tile_v, out.at[:, pl.ds(col, tile)])

        def signal(j, c):
            pl.semaphore_signal(sems.at[sige_t[j]], 1, core_index=sigc_t[j])
            return c

        jax.lax.fori_loop(sig0_t[t], sig0_t[t + 1], signal, 0)
        return carry

    jax.lax.fori_loop(0, qlen_t[core], run_task, 0)


@functools.partial(jax.jit, static_argnames=("cores", "tile", "eps", "n_events", "interpret"))
def mlp_persistent_pallas(tables: dict, x, w_norm, w_gate, w_up, w_down, *, cores: int,
                          tile: int, eps: float, n_events: int, interpret=None):
    """One persistent launch over `cores` workers. x: (B, D) f32; w_norm (1, D); w_gate, w_up
    (D, F) and w_down (F, D), stored input-major so a task's tile is a column block.
    Returns (out = x + MLP(rmsnorm(x)), xn, act, down), the last three the step's buffers."""
    require_tpu("mlp_persistent_pallas", "kernels.megakernel.persistent_triton")
    B, D = x.shape
    F = w_gate.shape[1]
    f32 = jnp.float32
    smem = [pltpu.SMEM(tables[k].shape, jnp.int32) for k in TABLES]
    scratch = [*smem, pltpu.VMEM((B, D), f32), pltpu.VMEM((B, D), f32), pltpu.VMEM((B, F), f32),
               pltpu.VMEM((1, D), f32), pltpu.VMEM((D, tile), f32), pltpu.VMEM((D, tile), f32),
               pltpu.VMEM((F, tile), f32), pltpu.VMEM((B, tile), f32),
               pltpu.VMEM((B, tile), f32), pltpu.SemaphoreType.DMA(()),
               pltpu.SemaphoreType.REGULAR((n_events,))]
    out_type = [jax.ShapeDtypeStruct((B, D), f32), jax.ShapeDtypeStruct((B, F), f32),
                jax.ShapeDtypeStruct((B, D), f32), jax.ShapeDtypeStruct((B, D), f32)]
    run = pl.kernel(functools.partial(_kernel, tile=tile, eps=eps), out_type,
                    mesh=pltpu.create_tensorcore_mesh("core", num_cores=cores),
                    scratch_types=scratch,
                    interpret=pallas_interpret() if interpret is None else interpret)
    xn, act, down, out = run(*(tables[k] for k in TABLES), x, w_norm, w_gate, w_up, w_down)
    return out, xn, act, down
