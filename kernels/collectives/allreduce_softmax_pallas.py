"""An all-reduce fused with the softmax that follows it, in Pallas TPU with remote DMA.

In tensor-parallel inference the last layer is row-parallel: every device holds partial logits
(m, v) and softmax(psum(partials)) follows. Unfused, psum runs a whole all-reduce (reduce-
scatter, then all-gather of the *logits*), writes them to HBM, and every device then reads all m
rows back and computes the same softmax n times. Fused, the softmax sits between the two halves
of the all-reduce: each device reduces its m/n rows (reduce-scatter), takes their softmax while
they are still in VMEM, and the all-gather moves probabilities instead of logits. Same bytes on
the wire; 1/n of the softmax work per device; no HBM round trip of the reduced logits.

Both halves are "direct" (one-shot) rather than ring: device j's rows go straight to device j
(reduce-scatter) and its probabilities straight to everyone (all-gather), n-1 DMAs in flight at
once, each landing in its own slot, so no slot is written twice and no handshake is needed
beyond the entry barrier and the DMA semaphores. Latency: 2 DMA rounds instead of 2(n-1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.collectives._args import check_2d, interpret_params


def _allreduce_softmax_kernel(x_ref, out_ref, parts, send_sem, recv_sem, *, axis: str, n: int):
    me = lax.axis_index(axis)
    r = x_ref.shape[0] // n  # rows each device reduces
    barrier = pltpu.get_barrier_semaphore()  # every peer's scratch exists before we write it
    for d in range(1, n):
        pltpu.semaphore_signal(barrier, 1, device_id=(lax.rem(me + d, n),),
                               device_id_type=pltpu.DeviceIdType.MESH)
    pltpu.semaphore_wait(barrier, n - 1)

    def rows(j):
        return pl.ds(pl.multiple_of(j * r, r), r)

    # reduce-scatter: my partial of device j's rows -> slot [me] of device j's `parts`
    sends = []
    for d in range(1, n):
        j = lax.rem(me + d, n)
        c = pltpu.make_async_remote_copy(x_ref.at[rows(j)], parts.at[me], send_sem.at[0],
                                         recv_sem.at[0], device_id=(j,),
                                         device_id_type=pltpu.DeviceIdType.MESH)
        c.start()
        sends.append(c)
    parts[me] = x_ref[rows(me)]
    for c in sends:
        c.wait_send()
        c.wait_recv()  # each incoming slot has this size: one arrival per wait
    total = parts[0].astype(jnp.float32)
    for j in range(1, n):  # the same order on every device: deterministic sums
        total = total + parts[j].astype(jnp.float32)
    z = total - jnp.max(total, axis=-1, keepdims=True)  # softmax of my rows, in VMEM
    e = jnp.exp(z)
    out_ref[rows(me), :] = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(out_ref.dtype)
    # all-gather: my probabilities -> the same rows of every other device's output
    sends = []
    for d in range(1, n):
        j = lax.rem(me + d, n)
        c = pltpu.make_async_remote_copy(out_ref.at[rows(me)], out_ref.at[rows(me)],
                                         send_sem.at[1], recv_sem.at[1], device_id=(j,),
                                         device_id_type=pltpu.DeviceIdType.MESH)
        c.start()
        sends.append(c)
    for c in sends:
        c.wait_send()
        c.wait_recv()


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "interpret"))
def allreduce_softmax(x, *, mesh, axis: str = "x", interpret=None):
    """softmax(psum(x, axis), axis=-1), fused. x: (n·m, v), device i's partial logits in rows
    [i·m, (i+1)·m) (a (n, m, v) stack sharded over `axis`, flattened); m must be a multiple of
    n (each device reduces m/n rows). Returns (n·m, v): every device's copy of the m rows,
    stacked (all equal)."""
    check_2d(x, "x")
    n = mesh.shape[axis]
    if x.shape[0] % n or (x.shape[0] // n) % n:
        raise ValueError(f"x has {x.shape[0]} rows: need n·m rows with m a multiple of n={n}")
    m, v = x.shape[0] // n, x.shape[1]
    call = pl.pallas_call(
        functools.partial(_allreduce_softmax_kernel, axis=axis, n=n),
        out_shape=jax.ShapeDtypeStruct((m, v), x.dtype),
        in_specs=[pl.BlockSpec(memory_space=pltpu.VMEM)],
        out_specs=pl.BlockSpec(memory_space=pltpu.VMEM),
        # one DMA semaphore pair per phase: a peer already in the all-gather sends as many
        # bytes per message as the reduce-scatter, so one shared counter would let its
        # probabilities stand in for partial sums that have not arrived
        scratch_shapes=[pltpu.VMEM((n, m // n, v), x.dtype), pltpu.SemaphoreType.DMA((2,)),
                        pltpu.SemaphoreType.DMA((2,))],
        compiler_params=pltpu.CompilerParams(collective_id=0, has_side_effects=True),
        interpret=interpret_params() if interpret is None else interpret,
    )
    P = jax.sharding.PartitionSpec
    return jax.shard_map(call, mesh=mesh, in_specs=P(axis, None), out_specs=P(axis, None),
                         check_vma=False)(x)


def allreduce_softmax_reference(x, *, mesh, axis: str = "x"):
    """The unfused sequence: lax.psum, then softmax (in fp32)."""
    P = jax.sharding.PartitionSpec

    def body(xs):
        s = lax.psum(xs.astype(jnp.float32), axis)
        return jax.nn.softmax(s, axis=-1).astype(xs.dtype)

    return jax.shard_map(body, mesh=mesh, in_specs=P(axis, None), out_specs=P(axis, None),
                         check_vma=False)(x)
