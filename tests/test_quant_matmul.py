"""kernels/quant matmuls (Triton; Pallas in test_quant_pallas.py) against float64 references."""

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.device import INTERPRET
from kernels.quant import quantize, quantized_matmul, quantized_matmul_reference
from kernels.quant.matmul_triton import CONFIGS, DECODE_MAX_M, MAX_SPLITS, plan
from shared import iocount
from shared.check import assert_close, fresh_seed, kernel_dtypes

GROUPED = {"int4": (32, 64, 128), "nf4": (64,)}


def _case(fmt, group, m, n, k_units, dtype, device, seed):
    """Fresh x [M, K], w [N, K]; K odd for the 8-bit formats, `k_units` groups for 4-bit."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = 2 * k_units + 1 if group is None else group * k_units
    w = torch.randn(n, k, generator=g, device=device) * 0.05
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    return x, quantize(w, fmt, group_size=group)


@settings(max_examples=8)
@given(fmt=st.sampled_from(["int8", "llm.int8", "int4", "nf4"]), data=st.data(),
       m=st.integers(1, 40), n=st.integers(1, 90), k_units=st.integers(1, 3))
def test_quantized_matmul_matches_float64(fmt, data, m, n, k_units, device):
    dtype = data.draw(st.sampled_from(kernel_dtypes(device)))
    group = data.draw(st.sampled_from(GROUPED[fmt])) if fmt in GROUPED else None
    k_units = k_units * 40 if group is None else k_units      # 8-bit: K from 81 to 241, odd
    x, qw = _case(fmt, group, m, n, k_units, dtype, device, fresh_seed())
    out = quantized_matmul(x, qw)
    ref = quantized_matmul_reference(x.double(), qw)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref, dtype=dtype, matmul=True, what=f"{fmt} g={group} {dtype} {m}x{n}")


@pytest.mark.parametrize("name", ["gemv", "decode", "prefill"])
@pytest.mark.parametrize("fmt,group", [("int4", 64), ("nf4", 64), ("int8", None),
                                       ("llm.int8", None)])
def test_every_configuration(name, fmt, group, device):
    # each tile shape at a size that is ragged for it (N and M not multiples of the tiles);
    # gemv at M = 2: two rows in one tile
    m = {"gemv": 2, "decode": 5, "prefill": 130}[name]
    x, qw = _case(fmt, group, m, 131, 3 if group else 70, torch.float16, device, fresh_seed())
    out = quantized_matmul(x, qw, config=CONFIGS[name])
    assert_close(out, quantized_matmul_reference(x.double(), qw), dtype=torch.float16,
                 matmul=True, what=f"{name} {fmt}")


@pytest.mark.parametrize("name", ["gemv", "decode"])     # prefill never splits
@pytest.mark.parametrize("fmt,group", [("int4", 32), ("nf4", 64), ("int8", None),
                                       ("llm.int8", None)])
def test_split_k_matches_float64(name, fmt, group, device):
    # K forced into 2 and 7 slices at small, odd sizes. 4-bit: 5 groups, so 2 splits are 3 + 2
    # steps and 7 are capped at 5; 8-bit: K = 201, so the last of 7 slices is ragged. The
    # partials are poisoned like the output: a slice the reduction misses, or one it reads
    # unwritten, turns the result NaN.
    m = {"gemv": 1, "decode": 3}[name]
    for splits in (2, 7):
        x, qw = _case(fmt, group, m, 45, 100 if group is None else 5, torch.float16, device,
                      fresh_seed())
        if INTERPRET:   # the second launch ran: the partials were reduced, not bypassed
            with iocount.count() as c:
                out = quantized_matmul(x, qw, config=CONFIGS[name], splits=splits)
            assert c.by_kernel["splitk_reduce_kernel"].launches == 1
        else:
            out = quantized_matmul(x, qw, config=CONFIGS[name], splits=splits)
        assert_close(out, quantized_matmul_reference(x.double(), qw), dtype=torch.float16,
                     matmul=True, what=f"{name} {fmt} splits={splits}")


@pytest.mark.parametrize("m", [1, 3])
def test_nf4_without_double_quant(m, device):
    g = torch.Generator(device=device).manual_seed(fresh_seed())
    w, x = torch.randn(37, 192, generator=g, device=device), torch.randn(m, 192, device=device)
    qw = quantize(w, "nf4", double_quant=False)
    assert_close(quantized_matmul(x, qw), quantized_matmul_reference(x.double(), qw),
                 matmul=True)


def test_plan_fills_an_h100_at_decode_and_keeps_prefill_whole():
    # Llama-7B's up and down projections on 132 SMs: decode splits K until the programs carry
    # 16 warps an SM (the plan's target), every split non-empty and whole steps; prefill is
    # one pass over K
    for n, k in ((11008, 4096), (4096, 11008)):
        for fmt, group in (("int4", 128), ("nf4", 64), ("int8", None)):
            for m in (1, 2, 16):
                p = plan(m, n, k, fmt, group, 132)
                cfg, step = p.config, p.config.step(fmt, group)
                assert cfg.gemv == (m <= 2) and cfg.block_m <= DECODE_MAX_M
                tiles = (1 if cfg.gemv else triton.cdiv(m, cfg.block_m)) * triton.cdiv(
                    n, cfg.block_n)
                warps = tiles * p.splits * cfg.num_warps
                assert warps >= 14 * 132 or p.splits == MAX_SPLITS, (fmt, m, n, p)
                assert p.k_per_split % step == 0
                assert (p.splits - 1) * p.k_per_split < k <= p.splits * p.k_per_split
            p = plan(512, n, k, fmt, group, 132)
            assert p.splits == 1 and p.k_per_split >= k and p.config == CONFIGS["prefill"]


@settings(max_examples=50)
@given(m=st.integers(1, 600), n=st.integers(1, 20000), k_steps=st.integers(1, 400),
       sms=st.integers(1, 200), forced=st.none() | st.integers(1, 64))
def test_plan_splits_cover_k_once(m, n, k_steps, sms, forced):
    k = 32 * k_steps - (k_steps > 1)           # int8: any K, the last step ragged
    p = plan(m, n, k, "int8", None, sms, splits=forced)
    step = p.config.step("int8", None)
    assert 1 <= p.splits <= max(MAX_SPLITS, forced or 1)
    assert p.k_per_split % step == 0
    assert (p.splits - 1) * p.k_per_split < k <= p.splits * p.k_per_split


def test_llm_int8_decomposition_keeps_outliers_exact(device):
    # One feature of x at 60 (LLM.int8() §3.2: emergent outliers): the decomposition keeps it
    # out of the int8 rows, so the result stays as close to x @ Wᵀ as int8 allows; quantizing
    # x whole would crush every other feature of those rows to a few levels.
    g = torch.Generator(device=device).manual_seed(fresh_seed())
    w = torch.randn(64, 129, generator=g, device=device) * 0.05
    x = torch.randn(8, 129, generator=g, device=device)
    x[:, 17] = 60.0
    exact = x.double() @ w.double().t()
    with_split = quantized_matmul(x, quantize(w, "llm.int8"))
    no_split = quantized_matmul(x, quantize(w, "llm.int8", threshold=1e9))
    err_split = (with_split.double() - exact).norm() / exact.norm()
    err_whole = (no_split.double() - exact).norm() / exact.norm()
    # int8 rows of x and W each round to ~1/127 of a row max of ~2.7σ: ~0.9% expected, so 2%;
    # a 60 in every row makes the step ~0.47σ for the whole-x path (~14%)
    assert err_split < 0.02 and err_whole > 3 * err_split, (err_split, err_whole)


def test_bad_matmul_arguments_name_the_argument():
    qw = quantize(torch.randn(8, 64), "int4", group_size=32)
    with pytest.raises(ValueError, match="x has K=63"):
        quantized_matmul(torch.randn(2, 63), qw)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        quantized_matmul(torch.randn(64), qw)
    with pytest.raises(TypeError, match="qw must be a QuantizedWeight"):
        quantized_matmul(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(TypeError, match="x must have dtype"):
        quantized_matmul(torch.ones(2, 64, dtype=torch.int64), qw)
    with pytest.raises(ValueError, match="x is empty"):
        quantized_matmul(torch.randn(0, 64), qw)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="splits must be a positive int"):
            quantized_matmul(torch.randn(2, 64), qw, splits=bad)
    with pytest.raises(ValueError, match="the gemv config holds every row"):
        quantized_matmul(torch.randn(17, 64), qw, config=CONFIGS["gemv"])

