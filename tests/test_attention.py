"""Triton FlashAttention (forward + FA2 backward) and the standard-attention baseline against
the float64 reference: ragged sequences, seq_q != seq_k, causal, MHA/GQA/MQA, odd head dims."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import (
    BlockSizes,
    attention_reference,
    flash_attention,
    standard_attention,
)
from shared import iocount
from shared.check import (
    assert_close,
    assert_close_to_reference,
    fresh_seed,
    kernel_device,
    kernel_dtypes,
    tolerance,
)

DTYPES = kernel_dtypes(kernel_device())      # bf16 only on CUDA (see shared.check)
TF32 = tolerance(torch.float32, matmul=True)  # fp32 through tl.dot: exact here, TF32 on a GPU


def make_inputs(b, h, h_kv, n_q, n_k, d, dtype, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_()
               for shape in ((b, h, n_q, d), (b, h_kv, n_k, d), (b, h_kv, n_k, d)))
    do = torch.randn((b, h, n_q, d), generator=g, device=device).to(dtype)
    return q, k, v, do


def reference_grads(q, k, v, do, dtype=torch.float64, **kw):
    """Output and (dq, dk, dv) of the reference on the same (rounded) inputs, computed in
    `dtype`: float64 is the truth; the inputs' own dtype is the peer FA's tests compare with."""
    qr, kr, vr = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = attention_reference(qr, kr, vr, **kw)
    o.backward(do.to(dtype))
    return o, (qr.grad, kr.grad, vr.grad)


def check_fwd_bwd(fn, q, k, v, do, what, **kw):
    """Output and every gradient against float64: on a GPU in 16 bits, at most 2x the error of
    the reference run in the same dtype (FA's criterion); else the dtype's tolerance."""
    o = fn(q, k, v, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype
    o.backward(do)
    ref_kw = {k_: kw[k_] for k_ in kw if k_ != "block_sizes"}
    o_ref, grads_ref = reference_grads(q, k, v, do, **ref_kw)
    peer = functools.cache(lambda: reference_grads(q, k, v, do, q.dtype, **ref_kw))
    assert_close_to_reference(o, o_ref, peer=lambda: peer()[0], matmul=True,
                              what=f"{what} output")
    for i, (name, x, g_ref) in enumerate(zip(("dq", "dk", "dv"), (q, k, v), grads_ref,
                                             strict=True)):
        assert x.grad.shape == x.shape and x.grad.dtype == x.dtype
        assert_close_to_reference(x.grad, g_ref, peer=lambda i=i: peer()[1][i], matmul=True,
                                  what=f"{what} {name}")


CASES = [  # b, h, h_kv, n_q, n_k, d, causal, dtype, (block_m, block_n)
    (1, 2, 2, 37, 37, 24, False, torch.float32, (16, 32)),     # MHA, ragged, d not 2^k
    (1, 2, 2, 37, 37, 24, True, torch.float32, (32, 16)),
    (2, 4, 2, 65, 100, 40, True, torch.float32, (32, 32)),     # GQA, seq_q < seq_k
    (1, 4, 1, 100, 37, 64, True, torch.float32, (32, 16)),     # MQA, seq_q > seq_k: empty rows
    (1, 3, 1, 100, 65, 16, False, torch.float16, (32, 32)),    # MQA, smallest head_dim
    (2, 2, 2, 65, 65, 128, True, torch.float16, (16, 16)),     # largest head_dim, many blocks
    (1, 6, 2, 1, 77, 80, True, torch.float16, (16, 32)),       # decoding: one query
    (1, 2, 1, 129, 100, 96, True, torch.float16, (64, 64)),    # default-size blocks
    (1, 2, 2, 70, 70, 64, False, torch.float16, None),         # default BlockSizes
]
# Every 16-bit case again in bf16 where the device computes it (CUDA; not the interpreter).
CASES += [(*c[:7], torch.bfloat16, c[8]) for c in CASES
          if c[7] == torch.float16 and torch.bfloat16 in DTYPES]


@pytest.mark.parametrize("b,h,h_kv,n_q,n_k,d,causal,dtype,blocks", CASES, ids=str)
def test_flash_matches_reference(b, h, h_kv, n_q, n_k, d, causal, dtype, blocks, device):
    seed = fresh_seed()
    q, k, v, do = make_inputs(b, h, h_kv, n_q, n_k, d, dtype, seed, device)
    bs = BlockSizes(*blocks) if blocks else None
    check_fwd_bwd(flash_attention, q, k, v, do, f"seed={seed}", causal=causal, block_sizes=bs)


def test_sm_scale_and_strided_inputs(device):
    seed = fresh_seed()
    q, k, v, do = make_inputs(1, 2, 2, 50, 43, 32, torch.float32, seed, device)
    # a (b, n, h, d) buffer seen as (b, h, n, d): not contiguous, as after a QKV projection
    q_t = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not q_t.is_contiguous()
    check_fwd_bwd(flash_attention, q_t, k, v, do, f"seed={seed}", causal=True, sm_scale=0.3)


def test_causal_bottom_right_alignment(device):
    q, k, v, _ = make_inputs(1, 2, 2, 40, 70, 32, torch.float32, fresh_seed(), device)
    bs = BlockSizes(16, 16)
    o = flash_attention(q, k, v, causal=True, block_sizes=bs)
    full = flash_attention(q, k, v, causal=False, block_sizes=bs)
    # the last query sees every key; the first sees keys 0..seq_k − seq_q (same tiles, same
    # running max: equal to fp32 rounding on any device)
    assert_close(o[:, :, -1], full[:, :, -1], tol=tolerance(torch.float32), what="last row")
    first = flash_attention(q[:, :, :1], k[:, :, :31], v[:, :, :31], block_sizes=bs)
    assert_close(o[:, :, :1], first, tol=tolerance(torch.float32), what="first row")


def test_rows_without_keys_are_zero(device):
    q, k, v, do = make_inputs(1, 1, 1, 50, 20, 16, torch.float32, fresh_seed(), device)
    o = flash_attention(q, k, v, causal=True, block_sizes=BlockSizes(16, 16))
    o.backward(do)
    assert torch.all(o[:, :, :30] == 0) and torch.all(q.grad[:, :, :30] == 0)
    assert torch.all(o[:, :, 30:].abs().sum(-1) > 0)


# n_k >= 2: with one key P = 1 and dQ is exactly 0, so a relative error is undefined (the
# kernel returns rounding noise from dP − D, where the reference returns exact zeros).
@given(n_q=st.integers(1, 90), n_k=st.integers(2, 90), d=st.integers(16, 128),
       heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]), causal=st.booleans(),
       blocks=st.sampled_from([(16, 16), (32, 64), (64, 32)]), seed=st.integers(0, 2**31),
       dtype=st.sampled_from(DTYPES))
def test_flash_property_any_shape(n_q, n_k, d, heads, causal, blocks, seed, dtype, device):
    q, k, v, do = make_inputs(1, *heads, n_q, n_k, d, dtype, seed, device)
    check_fwd_bwd(flash_attention, q, k, v, do, f"seed={seed}", causal=causal,
                  block_sizes=BlockSizes(*blocks))


@settings(max_examples=4)
@given(seed=st.integers(0, 2**31), group=st.sampled_from([2, 3]))
def test_gqa_equals_mha_with_repeated_kv(seed, group, device):
    """GQA = MHA on repeated K/V; its dK, dV = the repeated heads' gradients summed."""
    q, k, v, do = make_inputs(1, 2 * group, 2, 45, 53, 24, torch.float32, seed, device)
    bs = BlockSizes(16, 32)
    flash_attention(q, k, v, causal=True, block_sizes=bs).backward(do)
    k_rep, v_rep = (x.detach().repeat_interleave(group, 1).requires_grad_() for x in (k, v))
    q2 = q.detach().requires_grad_()
    flash_attention(q2, k_rep, v_rep, causal=True, block_sizes=bs).backward(do)
    for g_gqa, g_mha in ((k.grad, k_rep.grad), (v.grad, v_rep.grad)):
        summed = g_mha.reshape(1, 2, group, 53, 24).sum(2)
        assert_close(g_gqa, summed.double(), tol=TF32)
    assert_close(q.grad, q2.grad.double(), tol=TF32)


@settings(max_examples=4)
@given(seed=st.integers(0, 2**31))
def test_key_order_does_not_matter(seed, device):
    """Without a mask, attention is a set function of the (key, value) pairs. (Other tiles see
    another running max, so P is rounded differently for the TF32 product on a GPU.)"""
    q, k, v, _ = make_inputs(1, 2, 1, 33, 71, 40, torch.float32, seed, device)
    perm = torch.randperm(71, generator=torch.Generator(device=device).manual_seed(seed),
                          device=device)
    bs = BlockSizes(16, 16)
    assert_close(flash_attention(q, k[:, :, perm], v[:, :, perm], block_sizes=bs),
                 flash_attention(q, k, v, block_sizes=bs).double(), tol=TF32)


def test_single_key_gives_zero_dq_dk(device):
    """One key: P = 1 whatever q is, so dQ = dK = 0 exactly; the kernel's dP − D leaves only
    rounding noise (fp32, or TF32 on a GPU: relative to dV's size), and dV = Σ_rows dO."""
    q, k, v, do = make_inputs(1, 4, 2, 33, 1, 97, torch.float32, fresh_seed(), device)
    flash_attention(q, k, v, sm_scale=0.5, block_sizes=BlockSizes(16, 32)).backward(do)
    scale = v.grad.abs().max()
    assert q.grad.abs().max() < TF32 * scale and k.grad.abs().max() < TF32 * scale
    exact = 1e-5 if device == "cpu" else TF32      # dV = Pᵀ·dO is a TF32 product on a GPU
    assert_close(v.grad, do.double().reshape(1, 2, 2, 33, 97).sum((2, 3))[:, :, None], tol=exact)


def test_very_negative_scores_and_a_ragged_key_block(device):
    """Every score of a row near -160: L is too, so a padded key (score 0) would get
    P = exp(160) = inf in fp32 and dQ = inf · 0. The kernels mask the ragged key block (the dQ
    kernel too) and must match the float64 reference, finite."""
    seed = fresh_seed()
    q, k, v, do = make_inputs(1, 2, 1, 40, 37, 16, torch.float32, seed, device)
    u = torch.ones(16, device=device)
    # every key close to u, off by multiples of 1/16: exact in TF32, so a GPU's TF32 q·k adds
    # no error to scores of magnitude 160 (rounding k to 2^-11 moved them by ~0.02 and the
    # output by 0.8% on the H200, the test's own inputs, not the kernel, being ill-conditioned)
    k = (u + torch.round(1.6 * k.detach()) / 16).requires_grad_()
    q = (-40.0 * u).expand(1, 2, 40, 16).contiguous().requires_grad_()
    o = flash_attention(q, k, v, causal=False, block_sizes=BlockSizes(16, 16))
    o.backward(do)
    assert all(torch.isfinite(x).all() for x in (o, q.grad, k.grad, v.grad))
    # Ill-conditioned on purpose, so wider bars, stated: fp32 loses log2(160) ≈ 7 bits in s − L
    # here, and dq = Σ dS·k cancels about 10× since every k ≈ u. Worst of 30 seeds on the CPU:
    # 2.4e-4, so 50× fp32's bar there; on a GPU (TF32 dO·Vᵀ into dS, the same cancellation) 2×
    # TF32's. A missing mask gives inf or NaN, far outside either.
    bar = max(50 * tolerance(torch.float32), 2 * tolerance(torch.float32, matmul=True, device=q))
    o_ref, grads_ref = reference_grads(q, k, v, do, causal=False)
    for name, x, ref in zip(("output", "dq", "dk", "dv"), (o, q.grad, k.grad, v.grad),
                            (o_ref, *grads_ref), strict=True):
        assert_close(x, ref, tol=bar, what=f"seed={seed} {name}")


def test_configs_per_kernel_and_target():
    from kernels.attention.configs import for_capability

    assert for_capability(0, "dkdv", 128, 2) == BlockSizes(64, 64)   # the interpreter's
    with pytest.raises(ValueError, match="pass_ must be one of"):
        for_capability(90, "backward", 64, 2)
    for d in (64, 128):   # 16-bit, sm_90: the owned block feeds 64-row warpgroup MMAs
        assert for_capability(90, "dkdv", d, 2).block_n >= 64
        assert for_capability(90, "dq", d, 2).block_m >= 64
        assert for_capability(90, "forward", d, 2).block_m >= 64


@pytest.mark.parametrize("n_q,n_k,causal,dtype", [(37, 37, False, torch.float32),
                                                  (65, 100, True, torch.float16)])
def test_standard_attention_matches_reference(n_q, n_k, causal, dtype, device):
    seed = fresh_seed()
    q, k, v, do = make_inputs(2, 2, 2, n_q, n_k, 40, dtype, seed, device)
    check_fwd_bwd(standard_attention, q, k, v, do, f"standard seed={seed}", causal=causal,
                  block_sizes=BlockSizes(32, 32))


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=kernel_device())


BAD = [  # (q, k, v, kwargs, exception, words in the message)
    (_t(2, 8, 16), _t(2, 8, 16), _t(2, 8, 16), {}, ValueError, "q must have 4"),
    (_t(1, 4, 8, 32), _t(1, 3, 8, 32), _t(1, 3, 8, 32), {}, ValueError, "k has 3 heads"),
    (_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 9, 32), {}, ValueError, "v must have"),
    (_t(1, 2, 8, 32), _t(2, 2, 8, 32), _t(2, 2, 8, 32), {}, ValueError, "k has batch"),
    (_t(1, 2, 8, 32), _t(1, 2, 8, 24), _t(1, 2, 8, 24), {}, ValueError, "k has head_dim"),
    (_t(1, 2, 8, 8), _t(1, 2, 8, 8), _t(1, 2, 8, 8), {}, ValueError, "head_dim 8"),
    (_t(1, 2, 8, 160), _t(1, 2, 8, 160), _t(1, 2, 8, 160), {}, ValueError, "head_dim 160"),
    (_t(1, 2, 0, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), {}, ValueError, "q is empty"),
    (_t(1, 2, 8, 32), _t(1, 2, 8, 32, dtype=torch.float16), _t(1, 2, 8, 32), {}, TypeError, "k"),
    (_t(1, 2, 8, 32, dtype=torch.float64), _t(1, 2, 8, 32), _t(1, 2, 8, 32), {}, TypeError,
     "q must have dtype"),
    (_t(1, 2, 8, 32).cpu().numpy(), _t(1, 2, 8, 32), _t(1, 2, 8, 32), {}, TypeError,
     "q must be"),
    (_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), {"causal": 1}, TypeError, "causal"),
    (_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), {"sm_scale": -1.0}, ValueError,
     "sm_scale"),
    (_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), {"block_sizes": (64, 64)}, TypeError,
     "block_sizes"),
]


@pytest.mark.parametrize("q,k,v,kw,exc,words", BAD, ids=[b[-1] for b in BAD])
def test_bad_input_names_the_argument(q, k, v, kw, exc, words):
    with pytest.raises(exc, match=words):
        flash_attention(q, k, v, **kw)


def test_bad_block_sizes_and_standard_gqa():
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        BlockSizes(48, 64)
    with pytest.raises(ValueError, match="block_n"):
        BlockSizes(64, 8)
    with pytest.raises(ValueError, match="multi-head only"):
        standard_attention(_t(1, 4, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32))


def test_bf16_runs_only_where_it_is_computed_right():
    """Triton's interpreter computes bf16 on the raw bits: refused there, never a wrong answer;
    on a GPU it runs (CASES check its values)."""
    x = _t(1, 2, 8, 32, dtype=torch.bfloat16)
    if torch.bfloat16 in DTYPES:
        o = flash_attention(x, x, x)
        assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
    else:
        with pytest.raises(TypeError, match="q must have dtype"):
            flash_attention(x, x, x)


def _flash_forward_bytes(b, h, h_kv, n_q, n_k, d, bm, itemsize):
    """FA forward traffic, non-causal: Q read once, K and V once per query block (FA1 Thm 2),
    O written once, L (fp32) written once."""
    n_blocks = -(-n_q // bm)
    loaded = b * h * (n_q * d + 2 * n_blocks * n_k * d) * itemsize
    stored = b * h * (n_q * d * itemsize + n_q * 4)
    return loaded, stored


@pytest.mark.interpreter
@pytest.mark.parametrize("n_q,n_k,d,bm,bn", [(100, 77, 40, 32, 16), (64, 130, 64, 64, 32)])
def test_forward_traffic_is_exactly_the_io_model(n_q, n_k, d, bm, bn, device):
    q, k, v, _ = make_inputs(1, 2, 1, n_q, n_k, d, torch.float16, fresh_seed(), device)
    with iocount.count() as c:
        flash_attention(q, k, v, block_sizes=BlockSizes(bm, bn))
    assert (c.bytes_loaded, c.bytes_stored) == _flash_forward_bytes(1, 2, 1, n_q, n_k, d, bm, 2)
    assert c.launches == 1


@pytest.mark.interpreter
def test_causal_skips_blocks_and_standard_moves_more(device):
    q, k, v, do = make_inputs(1, 1, 1, 128, 128, 32, torch.float16, fresh_seed(), device)
    bs = BlockSizes(32, 32)
    counts = {}
    for name, fn, causal in (("flash", flash_attention, False),
                             ("flash causal", flash_attention, True),
                             ("standard", standard_attention, False)):
        with iocount.count() as c:
            fn(q, k, v, causal=causal, block_sizes=bs).backward(do)
        counts[name] = c
    # 4 query blocks see 1, 2, 3, 4 key blocks instead of 4 each: 10/16 of the dots
    assert counts["flash causal"].dot_flops * 16 == counts["flash"].dot_flops * 10
    assert counts["flash causal"].bytes_loaded < counts["flash"].bytes_loaded
    # standard attention writes S, P, dP, dS (4 N² values, fp16) and more besides
    assert counts["standard"].bytes_stored >= 4 * 128 * 128 * 2
    assert counts["standard"].bytes_total > 2 * counts["flash"].bytes_total


@pytest.mark.interpreter
def test_forward_and_backward_traffic_match_the_io_model():
    """Every byte and FLOP of forward + backward, as shared.benchmarks' model predicts."""
    from shared.benchmarks.flash_attention import count, flash_io_model

    for n, d, blocks in ((100, 40, BlockSizes(32, 16)), (130, 64, BlockSizes(64, 64))):
        assert count("flash", n, d, blocks=blocks) == flash_io_model(n, d, blocks)
