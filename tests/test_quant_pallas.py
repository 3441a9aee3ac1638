"""kernels/quant: the Pallas quantized matmul (interpret mode on CPU) against float64. A TPU
kernel: on a GPU host it runs in interpret mode on JAX's CPU device too (conftest's fixture),
and refuses the GPU target by name."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.quant import quantize, quantized_matmul_reference
from kernels.quant.matmul_pallas import quantized_matmul_pallas
from shared.check import assert_close, fresh_seed

pytestmark = pytest.mark.usefixtures("tpu_interpret_on_cpu")
GROUPS = {"int8": [None], "llm.int8": [None], "int4": [32, 64, 128], "nf4": [64]}


@settings(max_examples=6)
@given(fmt=st.sampled_from(sorted(GROUPS)), data=st.data(), m=st.integers(1, 20),
       n=st.integers(1, 200), units=st.integers(1, 2), half=st.booleans())
def test_pallas_matches_float64(fmt, data, m, n, units, half):
    group = data.draw(st.sampled_from(GROUPS[fmt]))
    g = torch.Generator().manual_seed(fresh_seed())
    k = 8 * group * units if group else 64 * units + 3      # int8: odd K; 4-bit: 1-2 chunks
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(torch.float16 if half else torch.float32)
    if fmt == "llm.int8":
        x[:, 1] = 9.0                                          # an outlier column
    qw = quantize(w, fmt, group_size=group)
    out = quantized_matmul_pallas(jnp.asarray(x.numpy()), qw)
    assert out.dtype == (jnp.float16 if half else jnp.float32) and out.shape == (m, n)
    ref = quantized_matmul_reference(x.double(), qw)
    assert_close(np.asarray(out), ref, dtype=x.dtype, matmul=True, what=f"{fmt} g={group}")


def test_pallas_prefill_block_rows():
    g = torch.Generator().manual_seed(fresh_seed())
    w, x = torch.randn(130, 256, generator=g), torch.randn(21, 256, generator=g)
    qw = quantize(w, "int4", group_size=32)
    out = quantized_matmul_pallas(jnp.asarray(x.numpy()), qw, tm=16)   # two row blocks
    assert_close(np.asarray(out), quantized_matmul_reference(x.double(), qw), matmul=True)


def test_pallas_bad_arguments():
    qw = quantize(torch.randn(8, 64), "int8")
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="tm=12 must be a positive multiple of 8"):
        quantized_matmul_pallas(x, qw, tm=12)
    with pytest.raises(ValueError, match="x has K=63"):
        quantized_matmul_pallas(jnp.ones((2, 63)), qw)


def test_pallas_refuses_gpu_target(monkeypatch):
    monkeypatch.setenv("KC_PALLAS_TARGET", "gpu")
    with pytest.raises(RuntimeError, match="quantized_matmul_pallas is a TPU kernel"):
        quantized_matmul_pallas(jnp.ones((2, 64)), quantize(torch.randn(8, 64), "int8"))
