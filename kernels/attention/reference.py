"""Attention, the specification (FA1 §2.2, "standard attention implementation").

    S = sm_scale · Q Kᵀ            (seq_q, seq_k) per head
    P = softmax(S) over keys, masked keys excluded
    O = P V

Multi-/grouped-query attention: query head h reads key/value head h // group.
Causal masks align to the bottom-right corner (as FlashAttention-2 does): query i sees key j
iff j <= i + (seq_k - seq_q), so the last query sees every key, as when decoding with a KV
cache. A query that sees no key (seq_q > seq_k) outputs zeros.

Written for clarity, not memory: S and P are materialised, (batch, heads, seq_q, seq_k).
Accepts torch tensors or JAX arrays; computes in the input dtype (pass float64 for a reference).
"""

from __future__ import annotations

from kernels.attention._args import attention_shape, check_causal, softmax_scale


def causal_mask(seq_q: int, seq_k: int, xp, like=None):
    """(seq_q, seq_k) bool, True where query i may see key j (bottom-right aligned); on the
    device of the torch tensor `like` (a CPU mask against CUDA scores fails on a GPU)."""
    where = {"device": like.device} if like is not None and hasattr(like, "device") and \
        xp.__name__ == "torch" else {}
    i = xp.arange(seq_q, **where)[:, None]
    j = xp.arange(seq_k, **where)[None, :]
    return j <= i + (seq_k - seq_q)


def attention_reference(q, k, v, *, causal: bool = False, sm_scale: float | None = None):
    """softmax(sm_scale · q kᵀ [+ causal mask]) v for (batch, heads, seq, head_dim) inputs."""
    shape = attention_shape(q, k, v)
    causal = check_causal(causal)
    scale = softmax_scale(sm_scale, shape.head_dim)
    try:
        import torch
        is_torch = isinstance(q, torch.Tensor)
    except ImportError:
        is_torch = False
    if is_torch:
        return _attention(q, k, v, causal, scale, shape.group, torch, torch.repeat_interleave)
    import jax.numpy as jnp

    return _attention(q, k, v, causal, scale, shape.group, jnp, jnp.repeat)


def _attention(q, k, v, causal, scale, group, xp, repeat):
    # GQA: give every query head its own copy of its key/value head (the spec, not the kernel).
    k = repeat(k, group, 1)                        # (B, H, Nk, D)
    v = repeat(v, group, 1)
    s = scale * (q @ k.swapaxes(-1, -2))           # (B, H, Nq, Nk)
    if causal:
        s = xp.where(causal_mask(q.shape[2], k.shape[2], xp, like=s), s, float("-inf"))
    # A softmax that tolerates rows with no visible key: shift by the row max (0 if none),
    # exp(-inf) = 0, and divide by the row sum (1 if none), so those rows output 0.
    m = xp.amax(s, -1)[..., None]                 # (B, H, Nq, 1)
    m = xp.where(xp.isfinite(m), m, 0.0)
    p = xp.exp(s - m)
    l = xp.sum(p, -1)[..., None]
    return (p @ v) / xp.where(l > 0, l, 1.0)
