"""Pallas FlashAttention (forward + backward through jax.custom_vjp) against the float64
reference, and the reference's JAX path. Each distinct shape costs a ~3 s compile in interpret
mode (running is fast), so the sweep is short and every case covers several features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import BlockSizes, attention_reference, flash_attention_pallas
from shared.check import assert_close, fresh_seed


def make_inputs(b, h, h_kv, n_q, n_k, d, dtype, seed):
    rng = np.random.default_rng(seed)
    shapes = ((b, h, n_q, d), (b, h_kv, n_k, d), (b, h_kv, n_k, d), (b, h, n_q, d))
    return [jnp.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]


def torch_reference(q, k, v, do, **kw):
    """float64 output and gradients of the reference, on the inputs as rounded to their dtype."""
    q64, k64, v64, do64 = (torch.from_numpy(np.asarray(x, dtype=np.float64)) for x in (q, k, v, do))
    for x in (q64, k64, v64):
        x.requires_grad_()
    o = attention_reference(q64, k64, v64, **kw)
    o.backward(do64)
    return o, (q64.grad, k64.grad, v64.grad)


def check_pallas(q, k, v, do, what, block_sizes=None, **kw):
    f = lambda q, k, v: flash_attention_pallas(q, k, v, block_sizes=block_sizes, **kw)

    @jax.jit
    def fwd_bwd(q, k, v, do):
        o, pull = jax.vjp(f, q, k, v)
        return o, pull(do)

    o, grads = fwd_bwd(q, k, v, do)
    o_ref, grads_ref = torch_reference(q, k, v, do, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert_close(o, o_ref, dtype=q.dtype, matmul=True, what=f"{what} output")
    for name, x, g, g_ref in zip(("dq", "dk", "dv"), (q, k, v), grads, grads_ref, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert_close(g, g_ref, dtype=q.dtype, matmul=True, what=f"{what} {name}")


CASES = [  # b, h, h_kv, n_q, n_k, d, causal, dtype, (block_m, block_n)
    (1, 2, 2, 37, 37, 24, False, jnp.float32, (16, 32)),      # MHA, ragged, d not 2^k
    (2, 4, 2, 65, 100, 40, True, jnp.float32, (32, 16)),      # GQA, seq_q < seq_k
    (1, 4, 1, 100, 37, 64, True, jnp.float16, (32, 32)),      # MQA, seq_q > seq_k: empty rows
    (1, 2, 1, 50, 77, 128, False, jnp.float16, None),         # largest head_dim, default blocks
    (1, 3, 3, 1, 70, 16, True, jnp.float32, (16, 16)),        # decoding: one query
    (1, 4, 2, 90, 61, 64, True, jnp.bfloat16, (32, 16)),      # bf16: correct in interpret mode
]


@pytest.mark.parametrize("b,h,h_kv,n_q,n_k,d,causal,dtype,blocks", CASES, ids=str)
def test_pallas_matches_reference(b, h, h_kv, n_q, n_k, d, causal, dtype, blocks):
    seed = fresh_seed()
    q, k, v, do = make_inputs(b, h, h_kv, n_q, n_k, d, dtype, seed)
    check_pallas(q, k, v, do, f"pallas seed={seed}", causal=causal, sm_scale=None,
                 block_sizes=BlockSizes(*blocks) if blocks else None)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=str)
def test_pallas_gpu_layout(dtype, monkeypatch):
    """The GPU variant: one-lane L and D instead of the TPU's 128 lanes (module docstring)."""
    monkeypatch.setenv("KC_PALLAS_TARGET", "gpu")
    seed = fresh_seed()
    q, k, v, do = make_inputs(2, 4, 2, 45, 70, 32, dtype, seed)
    check_pallas(q, k, v, do, f"pallas gpu layout seed={seed}", causal=True,
                 block_sizes=BlockSizes(16, 32))


@settings(max_examples=3)
# n_k >= 2: with one key P = 1 and dQ is exactly 0 (see test_attention.py)
@given(n_q=st.integers(1, 80), n_k=st.integers(2, 80), d=st.integers(16, 128),
       heads=st.sampled_from([(2, 2), (4, 2), (2, 1)]), causal=st.booleans(),
       sm_scale=st.sampled_from([None, 0.5]), seed=st.integers(0, 2**31))
def test_pallas_property_any_shape(n_q, n_k, d, heads, causal, sm_scale, seed):
    q, k, v, do = make_inputs(1, *heads, n_q, n_k, d, jnp.float32, seed)
    check_pallas(q, k, v, do, f"pallas seed={seed}", causal=causal, sm_scale=sm_scale,
                 block_sizes=BlockSizes(16, 32))


@pytest.mark.parametrize("causal", [False, True])
def test_reference_jax_path_matches_torch_path(causal):
    seed = fresh_seed()
    q, k, v, do = make_inputs(2, 4, 2, 30, 21, 24, jnp.float32, seed)
    o_ref, _ = torch_reference(q, k, v, do, causal=causal)
    out = attention_reference(q, k, v, causal=causal)
    assert isinstance(out, jax.Array)
    # the jnp reference's fp32 matmuls run at JAX's default precision: TF32 on a GPU
    assert_close(out, o_ref, dtype=jnp.float32, matmul=True, what=f"jax reference seed={seed}")


def _a(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("q,k,v,kw,exc,words", [
    (_a(1, 4, 8, 32), _a(1, 3, 8, 32), _a(1, 3, 8, 32), {}, ValueError, "k has 3 heads"),
    (_a(2, 8, 32), _a(2, 8, 32), _a(2, 8, 32), {}, ValueError, "q must have 4"),
    (_a(1, 2, 8, 200), _a(1, 2, 8, 200), _a(1, 2, 8, 200), {}, ValueError, "head_dim 200"),
    (_a(1, 2, 8, 32), _a(1, 2, 8, 32, dtype=jnp.float16), _a(1, 2, 8, 32), {}, TypeError,
     "k has dtype"),
    (_a(1, 2, 8, 32, dtype=jnp.int32), _a(1, 2, 8, 32), _a(1, 2, 8, 32), {}, TypeError,
     "q must have dtype"),
    (np.zeros((1, 2, 8, 32), np.float32), _a(1, 2, 8, 32), _a(1, 2, 8, 32), {}, TypeError,
     "q must be a jax.Array"),
    (_a(1, 2, 8, 32), _a(1, 2, 8, 32), _a(1, 2, 8, 32), {"causal": "yes"}, TypeError, "causal"),
    (_a(1, 2, 8, 32), _a(1, 2, 8, 32), _a(1, 2, 8, 32), {"sm_scale": float("nan")}, ValueError,
     "sm_scale"),
])
def test_pallas_bad_input_names_the_argument(q, k, v, kw, exc, words):
    with pytest.raises(exc, match=words):
        flash_attention_pallas(q, k, v, **kw)
