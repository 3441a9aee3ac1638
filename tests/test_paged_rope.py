"""RoPE (Triton and Pallas) against the float64 reference, forward and backward, both layouts;
the relative-position identity (R_m q)ᵀ(R_n k) = qᵀ R_{n−m} k as a property; and the fused
RoPE + paged-cache write against the unfused kernels and the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.paged import (
    rope,
    rope_cache_write,
    rope_cache_write_reference,
    rope_cache_write_unfused,
    rope_pallas,
    rope_reference,
)
from shared import iocount
from shared.check import assert_close, fresh_seed, kernel_device

DEVICE = kernel_device()
TOL = 1e-5   # fp32 with the angle in fp32, positions below 512 (rope_triton.py)


def _inputs(tokens, heads, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, head_dim, generator=g)
    return x, torch.randint(0, 512, (tokens,), generator=g), torch.randn(x.shape, generator=g)


def _reference(x, pos, dy, interleaved):
    x64 = x.double().requires_grad_()
    out = rope_reference(x64, pos, interleaved=interleaved)
    out.backward(dy.double())
    return out.detach(), x64.grad


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_triton_forward_and_backward(interleaved, head_dim):
    x, pos, dy = _inputs(37, 3, head_dim, fresh_seed())
    ref, dx_ref = _reference(x, pos, dy, interleaved)
    xt = x.to(DEVICE).requires_grad_()
    out = rope(xt, pos.to(DEVICE), interleaved=interleaved)
    out.backward(dy.to(DEVICE))
    assert_close(out, ref, tol=TOL, what="rope forward")
    assert_close(xt.grad, dx_ref, tol=TOL, what="rope backward")


@pytest.mark.usefixtures("tpu_interpret_on_cpu")   # rope_pallas is written for the TPU
@pytest.mark.parametrize("interleaved", [False, True])
def test_pallas_forward_and_backward(interleaved):
    x, pos, dy = _inputs(37, 3, 80, fresh_seed())
    ref, dx_ref = _reference(x, pos, dy, interleaved)
    xj, pj, dyj = jnp.asarray(x.numpy()), jnp.asarray(pos.numpy(), jnp.int32), jnp.asarray(
        dy.numpy())
    out, pull = jax.vjp(lambda a: rope_pallas(a, pj, interleaved=interleaved), xj)
    assert_close(np.asarray(out), ref, tol=TOL, what="rope_pallas forward")
    assert_close(np.asarray(pull(dyj)[0]), dx_ref, tol=TOL, what="rope_pallas backward")


def test_pallas_refuses_a_gpu_by_name(monkeypatch):
    monkeypatch.setenv("KC_PALLAS_TARGET", "gpu")   # pltpu.roll has no Triton lowering
    x = jnp.zeros((4, 2, 16), jnp.float32)
    with pytest.raises(RuntimeError, match="rope_pallas is a TPU kernel"):
        rope_pallas(x, jnp.arange(4, dtype=jnp.int32))


def test_layouts_differ_by_a_permutation_of_the_head_dim():
    x, pos, _ = _inputs(5, 2, 16, 0)
    perm = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])   # interleaved → half
    inter = rope_reference(x.double(), pos, interleaved=True)
    half = rope_reference(x.double()[..., perm], pos, interleaved=False)
    torch.testing.assert_close(inter[..., perm], half)


@settings(max_examples=8)
@given(m=st.integers(0, 400), n=st.integers(0, 400), interleaved=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_relative_position_identity(m, n, interleaved, seed):
    """RoFormer eq. 16: the score depends on the positions only through n − m."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, 64, generator=g), torch.randn(1, 2, 64, generator=g)
    at = lambda x, p: rope(x.to(DEVICE), torch.tensor([p], device=DEVICE),  # noqa: E731
                           interleaved=interleaved).double().cpu()
    lhs = (at(q, m) * at(k, n)).sum(-1)
    rhs = (q.double() * at(k, n - m)).sum(-1)
    scale = (q.norm(dim=-1) * k.norm(dim=-1)).double()
    assert torch.all((lhs - rhs).abs() <= 2e-5 * scale), (lhs, rhs)


def _write_inputs(dtype, seed, heads=(4, 2), head_dim=80, blocks=12, block=16, tokens=21):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q = torch.randn(tokens, hq, head_dim, generator=g).to(dtype)
    k = torch.randn(tokens, hkv, head_dim, generator=g).to(dtype)
    v = torch.randn(tokens, hkv, head_dim, generator=g).to(dtype)
    pos = torch.randint(0, 300, (tokens,), generator=g)
    slots = torch.randperm(blocks * block, generator=g)[:tokens].to(torch.int32)
    slots[3] = -1                                     # a padding token: written nowhere
    caches = torch.full((2, blocks, block, hkv, head_dim), float("nan"), dtype=dtype)
    return q, k, v, pos, slots, caches


@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_cache_write(interleaved):
    q, k, v, pos, slots, caches = _write_inputs(torch.float32, fresh_seed())
    ref_k, ref_v = caches.double()
    q_ref = rope_cache_write_reference(q.double(), k.double(), v.double(), pos, slots, ref_k,
                                       ref_v, interleaved=interleaved)
    dev = [x.to(DEVICE) for x in (q, k, v, pos, slots)]
    for fn in (rope_cache_write, rope_cache_write_unfused):
        kc, vc = caches.clone().to(DEVICE)
        q_out = fn(*dev, kc, vc, interleaved=interleaved)
        assert_close(q_out, q_ref, tol=TOL, what=f"{fn.__name__} q")
        written = ~torch.isnan(ref_k)
        assert torch.equal(~torch.isnan(kc.cpu()), written), "slots written ≠ slot_mapping"
        assert_close(kc.cpu()[written], ref_k[written], tol=TOL, what=f"{fn.__name__} k")
        assert torch.equal(vc.cpu()[written].double(), ref_v[written])


@pytest.mark.interpreter
def test_fused_write_saves_a_write_and_a_read_of_k():
    q, k, v, pos, slots, caches = _write_inputs(torch.float16, 0, tokens=32)
    slots[3] = 7   # every token written, so the saving is exactly 2 · |k|
    counts = []
    for fn in (rope_cache_write, rope_cache_write_unfused):
        with iocount.count() as c:
            fn(q, k, v, pos, slots, *caches.clone())
        counts.append(c)
    fused, unfused = counts
    assert fused.launches == 1 and unfused.launches == 3
    k_bytes = k.numel() * k.element_size()
    pos_bytes = pos.numel() * pos.element_size()
    # unfused also re-reads the positions in its second rope (per head, as the fused does)
    extra = unfused.bytes_total - fused.bytes_total
    assert extra == 2 * k_bytes + pos_bytes * k.shape[1] - slots.numel() * 4 * (
        k.shape[1] - 1), (extra, k_bytes)


@pytest.mark.parametrize(("make", "error", "name"), [
    (lambda x, p: (x[0], p), ValueError, "x"),
    (lambda x, p: (x[..., :15], p), ValueError, "head_dim"),
    (lambda x, p: (x, p[:-1]), ValueError, "positions"),
    (lambda x, p: (x, p.float()), TypeError, "positions"),
    (lambda x, p: (x.int(), p), TypeError, "x"),
])
def test_bad_input(make, error, name):
    x, pos, _ = _inputs(5, 2, 16, 0)
    bad_x, bad_pos = make(x, pos)
    with pytest.raises(error, match=name):
        rope(bad_x, bad_pos)
    with pytest.raises(error, match=name):
        rope_pallas(jnp.asarray(bad_x.numpy()), jnp.asarray(bad_pos.numpy()))
