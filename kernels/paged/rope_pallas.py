"""RoPE in Pallas on JAX arrays (TPU layout), the twin of rope_triton.py; a jax.custom_vjp whose
backward is the same kernel rotating by −angle (a rotation's transpose).

TPU layout: x (tokens, heads, head_dim) is viewed as (tokens, heads · head_dim), a free reshape,
so a block is (block_t, heads · head_dim) with the whole lane dim, and positions as (tokens, 1).
Picking a pair's partner by lane slicing (x[..., ::2], x[..., :d/2]) would cut vregs at odd
offsets; instead each lane takes its partner from a lane rotation (pltpu.roll, the XLU's
native op): partner = x[l + s] for the first member of a pair and x[l − s] for the second,
s = 1 interleaved or d/2 half-split. Neither rotation crosses a head for the lanes that use it.
out = x · cos + partner · (∓ sin): − for the first member, + for the second.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.device import pallas_interpret
from kernels.paged._args import rope_shape
from kernels.tpu_lowering import compiler_params, require_tpu

F32 = jnp.float32
BLOCK_T = 64   # tokens per grid step (a multiple of 8: the sublane rule)


def _kernel(pos_ref, x_ref, o_ref, *, head_dim: int, log_theta: float, interleaved: bool,
            sign: float):
    x = x_ref[...].astype(F32)                                  # (block_t, heads · head_dim)
    width = x.shape[1]
    lane = lax.rem(lax.broadcasted_iota(jnp.int32, x.shape, 1), head_dim)   # column in head
    half = head_dim // 2
    if interleaved:
        pair, first, shift = lax.div(lane, 2), lax.rem(lane, 2) == 0, 1
    else:
        pair, first, shift = lax.rem(lane, half), lane < half, half
    inv_freq = jnp.exp(pair.astype(F32) * (-2.0 * log_theta / head_dim))    # θ^(−2i/d)
    angle = pos_ref[...].astype(F32) * inv_freq                 # (block_t, 1) · (block_t, W)
    # pltpu.roll(x, s)[l] = x[l − s]: the partner of a first member is x[l + s] = roll(W − s)
    partner = jnp.where(first, pltpu.roll(x, width - shift, 1), pltpu.roll(x, shift, 1))
    sin = jnp.sin(angle) * sign
    o_ref[...] = (x * jnp.cos(angle) + partner * jnp.where(first, -sin, sin)).astype(o_ref.dtype)


def _rope(x, positions, theta: float, interleaved: bool, sign: float, interpret):
    tokens, heads, head_dim = x.shape
    padded = -(-tokens // BLOCK_T) * BLOCK_T
    flat = jnp.pad(x.reshape(tokens, heads * head_dim), ((0, padded - tokens), (0, 0)))
    pos = jnp.pad(positions.astype(jnp.int32), (0, padded - tokens))[:, None]
    kernel = functools.partial(_kernel, head_dim=head_dim, log_theta=math.log(theta),
                               interleaved=interleaved, sign=sign)
    out = pl.pallas_call(
        kernel,
        grid=(padded // BLOCK_T,),
        in_specs=[pl.BlockSpec((BLOCK_T, 1), lambda i: (i, 0)),
                  pl.BlockSpec((BLOCK_T, heads * head_dim), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((BLOCK_T, heads * head_dim), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(flat.shape, x.dtype),
        compiler_params=compiler_params("tpu", ("parallel",)),
        interpret=interpret,
    )(pos, flat)
    return out[:tokens].reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rope_vjp(x, positions, theta, interleaved, interpret):
    return _rope(x, positions, theta, interleaved, 1.0, interpret)


def _fwd(x, positions, theta, interleaved, interpret):
    return _rope(x, positions, theta, interleaved, 1.0, interpret), positions


def _bwd(theta, interleaved, interpret, positions, grad):
    # positions are integers: their cotangent is the float0 zero JAX expects of int inputs
    zero = jnp.zeros(positions.shape, jax.dtypes.float0)
    return _rope(grad, positions, theta, interleaved, -1.0, interpret), zero


_rope_vjp.defvjp(_fwd, _bwd)


def rope_pallas(x, positions, *, theta: float = 10000.0, interleaved: bool = False,
                interpret=None):
    """rope on JAX arrays: x (tokens, heads, head_dim) at positions (tokens,); differentiable
    in x (jax.grad, jax.vjp). interpret: None (interpret on a CPU), a bool or InterpretParams."""
    rope_shape(x, positions, theta, interleaved)
    require_tpu("rope_pallas", "kernels.paged.rope_triton")   # pltpu.roll: a TPU-only op
    if x.shape[0] == 0:
        return x
    return _rope_vjp(x, positions, float(theta), interleaved,
                     pallas_interpret() if interpret is None else interpret)
