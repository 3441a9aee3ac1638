"""The two algorithms as plain jitted JAX, for wall-clock on a CPU where XLA compiles them.

The online normaliser is a reduction over pairs (m, d) with the paper's parallel ⊕ operator:
    (m₁, d₁) ⊕ (m₂, d₂) = (max(m₁, m₂), d₁·exp(m₁ − m) + d₂·exp(m₂ − m)),  m = max(m₁, m₂)
It is associative and commutative, so XLA may split the row across threads and vector lanes
in any order (lax.reduce requires exactly that). Each element enters as (x, 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _rescale(m_part, m):
    return jnp.where(m_part == -jnp.inf, 0.0, jnp.exp(m_part - m))


def _combine(a, b):
    (m_a, d_a), (m_b, d_b) = a, b
    m = jnp.maximum(m_a, m_b)
    return m, d_a * _rescale(m_a, m) + d_b * _rescale(m_b, m)


@jax.jit
def softmax_xla_online(x: jax.Array) -> jax.Array:
    """Softmax over the last axis: one ⊕-reduction for (m, d), then one normalising sweep."""
    zero = jnp.zeros((), x.dtype)
    m, d = lax.reduce((x, jnp.ones_like(x)), (zero - jnp.inf, zero), _combine, (x.ndim - 1,))
    return jnp.exp(x - m[..., None]) / d[..., None]


@jax.jit
def softmax_xla_safe(x: jax.Array) -> jax.Array:
    """Softmax over the last axis in three sweeps: max, Σexp, normalise (Algorithm 2)."""
    m = x.max(axis=-1, keepdims=True)
    d = jnp.exp(x - m).sum(axis=-1, keepdims=True)
    return jnp.exp(x - m) / d
