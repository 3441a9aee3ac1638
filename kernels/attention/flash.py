"""`flash_attention`: the Triton kernels behind a torch.autograd.Function."""

from __future__ import annotations

import torch

from kernels.attention._args import (
    BlockSizes,
    attention_shape,
    check_causal,
    softmax_scale,
)
from kernels.attention.configs import default_blocks
from kernels.attention.triton_bwd import flash_backward
from kernels.attention.triton_fwd import flash_forward
from kernels.device import INTERPRET
from kernels.validate import check_same_device, check_same_dtype, check_tensor


def check_torch_inputs(q, k, v):
    """Type, dtype and device checks for the Triton kernels; returns the AttentionShape."""
    # bf16 only on a GPU: the interpreter computes bf16 on the raw bits
    # (docs/cpu-notes.md, "Triton's interpreter").
    dtypes = (torch.float16, torch.float32) if INTERPRET else (
        torch.float16, torch.bfloat16, torch.float32)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name, ndim=4, dtypes=dtypes)
    check_same_dtype(("q", q), ("k", k), ("v", v))
    check_same_device(("q", q), ("k", k), ("v", v))
    return attention_shape(q, k, v)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, shape, causal, sm_scale, blocks):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        size = q.element_size()
        fwd = blocks or default_blocks("forward", shape.head_dim, size)
        o, lse = flash_forward(q, k, v, shape, causal, sm_scale, fwd)
        # Saved: inputs, O and L (B·H·Nq floats), never S or P (FA1 §3.1).
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.shape, ctx.causal, ctx.sm_scale = shape, causal, sm_scale
        ctx.blocks = (blocks or default_blocks("dkdv", shape.head_dim, size),
                      blocks or default_blocks("dq", shape.head_dim, size))
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(q, k, v, o, lse, do.contiguous(), ctx.shape, ctx.causal,
                                    ctx.sm_scale, *ctx.blocks)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None
                    ) -> torch.Tensor:
    """softmax(sm_scale · q kᵀ) v without materialising the scores; differentiable.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, kv_heads, seq_k, head_dim), kv_heads
    dividing heads (MQA/GQA). head_dim 16..128; fp16/fp32 (and bf16 on a GPU). `causal` masks
    bottom-right aligned; sm_scale defaults to 1/sqrt(head_dim). `block_sizes` left out, the
    forward and the two backward kernels each take their config for this GPU
    (kernels/attention/configs.py); given, it serves all three.
    """
    shape = check_torch_inputs(q, k, v)
    causal = check_causal(causal)
    scale = softmax_scale(sm_scale, shape.head_dim)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    return FlashAttention.apply(q, k, v, shape, causal, scale, block_sizes)
