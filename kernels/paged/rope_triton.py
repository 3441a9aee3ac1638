"""Rotary position embedding (RoFormer, Su et al. 2021, §3.4) in Triton, differentiable.

Pair i of every head is rotated by the angle position · θ^(−2i/d) (RoFormer eq. 15):
(x1, x2) -> (x1 cos − x2 sin, x2 cos + x1 sin). The backward is the transpose of a rotation,
the rotation by −angle, so it is the same kernel with sin negated (SIGN = −1): no saved tensors
but the positions.

Precision: cos and sin are evaluated in fp32 from an fp32 angle, as Llama/HF do. The angle's
absolute error grows like position · 2^−24, so at position 10^4 the result carries ~1e−3 of
error against a float64 reference; the tests check 1e−5 at positions below 512 (see the lab).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.device import new_output
from kernels.launch import flat_grid, offset, split_program_id
from kernels.paged._args import rope_shape
from kernels.validate import check_same_device, check_tensor

BLOCK_T = 16   # tokens per program


@triton.jit
def rope_cos_sin(POS, offs_t, t_ok, offs_p, half, log2_theta):
    """(BLOCK_T, BLOCK_P) cos and sin of position · θ^(−i/half) for pair index i."""
    pos = tl.load(POS + offs_t, mask=t_ok, other=0).to(tl.float32)
    inv_freq = tl.exp2(-(offs_p.to(tl.float32) / half) * log2_theta)   # θ^(−2i/d)
    angle = pos[:, None] * inv_freq[None, :]
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def rope_pair_columns(offs_p, half, INTERLEAVED: tl.constexpr):
    """Head-dim columns of pair i: (2i, 2i + 1) interleaved (RoFormer), (i, i + d/2) half-split
    (Llama/HF)."""
    if INTERLEAVED:
        return 2 * offs_p, 2 * offs_p + 1
    else:
        return offs_p, offs_p + half


@triton.jit
def rope_tile(POS, tokens, half, log2_theta, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_P: tl.constexpr):
    """What every RoPE program starts from: its head h and BLOCK_T tokens (a flat grid of token
    blocks × heads), their mask, the cos/sin of their angles and the pair columns."""
    t_block, h = split_program_id(tl.cdiv(tokens, BLOCK_T))
    offs_t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    t_ok = offs_t < tokens
    ok = t_ok[:, None] & (offs_p < half)[None, :]
    cos, sin = rope_cos_sin(POS, offs_t, t_ok, offs_p, half, log2_theta)
    c1, c2 = rope_pair_columns(offs_p, half, INTERLEAVED)
    return h, offs_t, t_ok, ok, cos, sin, c1, c2


@triton.jit
def rope_rotate(X, OUT, x_rows, o_rows, c1, c2, ok, cos, sin):
    """Load the pairs at X + x_rows + (c1, c2), rotate, store at OUT + o_rows + (c1, c2)."""
    x1 = tl.load(X + x_rows[:, None] + c1[None, :], mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_rows[:, None] + c2[None, :], mask=ok, other=0.0).to(tl.float32)
    dtype = OUT.dtype.element_ty
    tl.store(OUT + o_rows[:, None] + c1[None, :], (x1 * cos - x2 * sin).to(dtype), mask=ok)
    tl.store(OUT + o_rows[:, None] + c2[None, :], (x2 * cos + x1 * sin).to(dtype), mask=ok)


@triton.jit
def rope_kernel(
    X, POS, OUT,                 # x, out: (tokens, heads, head_dim) contiguous; pos (tokens,)
    tokens, heads, half, log2_theta, sign,
    INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    h, offs_t, _, ok, cos, sin, c1, c2 = rope_tile(POS, tokens, half, log2_theta, INTERLEAVED,
                                                   BLOCK_T, BLOCK_P)   # one head, BLOCK_T tokens
    rows = offset(offs_t * heads + h, 2 * half)
    rope_rotate(X, OUT, rows, rows, c1, c2, ok, cos, sin * sign)


def launch_rope(kernel, tokens: int, heads: int, half: int, *args, **meta) -> None:
    """Launch a RoPE kernel: BLOCK_T tokens × one head per program, the pairs padded to a power
    of two (>= 16); `args` are the kernel's arguments before `tokens`."""
    kernel[flat_grid(triton.cdiv(tokens, BLOCK_T), heads)](
        *args, BLOCK_T=BLOCK_T, BLOCK_P=max(16, triton.next_power_of_2(half)), num_warps=4,
        **meta)


def _launch(x: torch.Tensor, positions: torch.Tensor, theta: float, interleaved: bool,
            sign: float) -> torch.Tensor:
    tokens, heads, head_dim = x.shape
    out = new_output(x.shape, x.dtype, x.device)
    if tokens == 0:
        return out
    half = head_dim // 2
    launch_rope(rope_kernel, tokens, heads, half, x.contiguous(), positions.contiguous(), out,
                tokens, heads, half, math.log2(theta), sign, INTERLEAVED=interleaved)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, theta, interleaved):
        ctx.save_for_backward(positions)
        ctx.theta, ctx.interleaved = theta, interleaved
        return _launch(x, positions, theta, interleaved, 1.0)

    @staticmethod
    def backward(ctx, grad):   # R(−angle) = R(angle)ᵀ: rotate the gradient back
        (positions,) = ctx.saved_tensors
        return _launch(grad, positions, ctx.theta, ctx.interleaved, -1.0), None, None, None


def check_rope(x, positions, theta, interleaved) -> None:
    check_tensor(x, "x", nonempty=False)
    check_tensor(positions, "positions", nonempty=False)
    check_same_device(("x", x), ("positions", positions))
    rope_shape(x, positions, theta, interleaved)


def rope(x, positions, *, theta: float = 10000.0, interleaved: bool = False) -> torch.Tensor:
    """x: (tokens, heads, head_dim) rotated by RoPE at `positions` (tokens,); differentiable
    in x. interleaved=True pairs (2i, 2i+1) as RoFormer; False pairs (i, i + d/2) as Llama/HF."""
    check_rope(x, positions, theta, interleaved)
    return _Rope.apply(x, positions, float(theta), interleaved)
