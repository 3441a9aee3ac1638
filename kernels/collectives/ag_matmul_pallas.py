"""All-gather fused with matmul (the AG-GEMM of T3, Pati et al. ASPLOS 2024, and FLUX, Chang et
al. 2024) in Pallas TPU, over a ring of devices with remote DMA.

Tensor parallelism's first layer needs y = all_gather(x) @ w: every device holds m rows of x and
the same w block. Unfused, the all-gather runs its n-1 ring steps, writes the gathered (n·m, k)
x to HBM, and only then the matmul reads it back. Fused, step s multiplies the chunk already in
VMEM (from device me-s) while the DMA forwarding that same chunk to the right neighbour is in
flight; the gathered x never exists in HBM.

Flow control (what makes it race-free under detect_races): the chunk travels in a two-slot
VMEM buffer. At step s a device reads slot s%2 and its left neighbour writes slot (s+1)%2, which
this device last read at step s-1. So before a device sends at step s it waits for its right
neighbour's "ready" (a REGULAR semaphore the neighbour signals remotely once step s-1 is done),
and it signals its own left neighbour the same way. A barrier at entry makes sure every device
is inside the kernel (its scratch exists) before the first remote write.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.collectives._args import check_2d, interpret_params


def _ag_matmul_kernel(x_ref, w_ref, out_ref, buf, send_sem, recv_sem, ready_sem, *,
                      axis: str, n: int, handshake: bool):
    me = lax.axis_index(axis)
    right, left = lax.rem(me + 1, n), lax.rem(me + n - 1, n)
    m = x_ref.shape[0]
    barrier = pltpu.get_barrier_semaphore()  # entry barrier with both ring neighbours
    for peer in (left, right):
        pltpu.semaphore_signal(barrier, 1, device_id=(peer,),
                               device_id_type=pltpu.DeviceIdType.MESH)
    pltpu.semaphore_wait(barrier, 2)
    buf[0] = x_ref[...]
    for s in range(n):  # unrolled: n is the mesh axis size, static
        slot = s % 2
        if s < n - 1:
            copy = pltpu.make_async_remote_copy(
                buf.at[slot], buf.at[1 - slot], send_sem, recv_sem, device_id=(right,),
                device_id_type=pltpu.DeviceIdType.MESH)
            if s > 0 and handshake:  # my left neighbour may now overwrite slot 1-slot
                pltpu.semaphore_signal(ready_sem, 1, device_id=(left,),
                                       device_id_type=pltpu.DeviceIdType.MESH)
                pltpu.semaphore_wait(ready_sem, 1)  # ...and my right one has said the same
            copy.start()  # forward the chunk I hold to the right, while I multiply it
        src = lax.rem(me + n - s, n)  # whose rows sit in my slot at step s
        rows = pl.ds(pl.multiple_of(src * m, m), m)
        out_ref[rows, :] = jnp.dot(buf[slot], w_ref[...],
                                   preferred_element_type=jnp.float32).astype(out_ref.dtype)
        if s < n - 1:
            copy.wait_send()
            copy.wait_recv()  # the next chunk is in slot 1-slot


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "interpret", "handshake"))
def ag_matmul(x, w, *, mesh, axis: str = "x", interpret=None, handshake: bool = True):
    """all_gather(x, axis) @ w, fused. x: (n·m, k) sharded by rows over `axis` (m rows per
    device), w: (k, f) replicated; returns (n·m, f), replicated. handshake=False drops the
    flow control: a left neighbour may then overwrite a slot still being read, which
    detect_races reports (the tests' and the lab's negative control; never use it)."""
    check_2d(x, "x")
    check_2d(w, "w")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x {x.shape} and w {w.shape}: x's columns must equal w's rows")
    n = mesh.shape[axis]
    if x.shape[0] % n:
        raise ValueError(f"x has {x.shape[0]} rows, not a multiple of the {n} devices on {axis!r}")
    m, (k, f) = x.shape[0] // n, w.shape
    kernel = functools.partial(_ag_matmul_kernel, axis=axis, n=n, handshake=handshake)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n * m, f), x.dtype),
        in_specs=[pl.BlockSpec(memory_space=pltpu.VMEM)] * 2,
        out_specs=pl.BlockSpec(memory_space=pltpu.VMEM),
        scratch_shapes=[pltpu.VMEM((2, m, k), x.dtype), pltpu.SemaphoreType.DMA,
                        pltpu.SemaphoreType.DMA, pltpu.SemaphoreType.REGULAR],
        compiler_params=pltpu.CompilerParams(collective_id=0, has_side_effects=True),
        interpret=interpret_params() if interpret is None else interpret,
    )
    P = jax.sharding.PartitionSpec
    return jax.shard_map(call, mesh=mesh, in_specs=(P(axis, None), P(None, None)),
                         out_specs=P(None, None), check_vma=False)(x, w)


def ag_matmul_reference(x, w, *, mesh, axis: str = "x"):
    """The unfused sequence: lax.all_gather, then the matmul."""
    P = jax.sharding.PartitionSpec

    def body(xs, w):
        full = lax.all_gather(xs, axis, tiled=True)
        return jnp.dot(full, w, preferred_element_type=jnp.float32).astype(xs.dtype)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(axis, None), P(None, None)),
                         out_specs=P(None, None), check_vma=False)(x, w)
