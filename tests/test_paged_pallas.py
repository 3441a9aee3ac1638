"""The Pallas paged attention against the float64 reference, under TPU interpret mode with the
race detector on (two simulated cores), and a racy control kernel the detector must catch.
On a GPU host too: TPU interpret mode on JAX's CPU device (conftest's tpu_interpret_on_cpu)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.paged import paged_attention_pallas, paged_attention_reference
from kernels.paged.reference import random_paged_inputs
from shared.check import assert_close, fresh_seed

pytestmark = pytest.mark.usefixtures("tpu_interpret_on_cpu")
BLOCK = 16
RACES = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)


def paged_inputs(lengths, heads, kv_heads, head_dim, dtype, seed=0):
    return random_paged_inputs(lengths, heads, kv_heads, head_dim, dtype, block_size=BLOCK,
                               seed=seed)


def reference64(q, k, v, tables, lens):
    return paged_attention_reference(q.double(), k.double(), v.double(), tables, lens)


def _jax(*xs):
    return [jnp.asarray(x.cpu().numpy()) for x in xs]


def races_found() -> bool:
    # Private: jax 0.10 exposes the detector's verdict only as module state of the interpreter.
    return bool(tpu_interpret.races is not None and tpu_interpret.races.races_found)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "splits", "lengths"), [
    (8, 2, 80, 3, (0, 1, BLOCK + 1, 70)),        # GQA 4, padded head_dim, empty splits
    (8, 8, 64, 2, (3, BLOCK - 1)),               # MHA
    (8, 1, 128, 1, (BLOCK, 33)),                 # MQA
])
def test_against_reference_race_free(heads, kv_heads, head_dim, splits, lengths):
    inputs = paged_inputs(lengths, heads, kv_heads, head_dim, torch.float32, seed=fresh_seed())
    out = paged_attention_pallas(*_jax(*inputs), num_splits=splits, interpret=RACES)
    assert not races_found(), "race between parallel grid steps"
    assert_close(np.asarray(out), reference64(*inputs), dtype=torch.float32, matmul=True,
                 what="paged_attention_pallas")
    assert np.all(np.asarray(out)[[i for i, n in enumerate(lengths) if n == 0]] == 0)


def test_fp16_and_long_sequence_default_splits():
    inputs = paged_inputs((513, 5), 4, 2, 64, torch.float16, seed=fresh_seed())
    out = paged_attention_pallas(*_jax(*inputs))
    assert out.dtype == jnp.float16
    assert_close(np.asarray(out.astype(jnp.float32)), reference64(*inputs),
                 dtype=torch.float16, matmul=True, what="paged_attention_pallas fp16")


def test_refuses_a_gpu_target(monkeypatch):
    monkeypatch.setenv("KC_PALLAS_TARGET", "gpu")   # no scalar prefetch in the Triton lowering
    inputs = paged_inputs((5,), 4, 2, 64, torch.float32, seed=fresh_seed())
    with pytest.raises(RuntimeError, match="paged_attention_pallas is a TPU kernel"):
        paged_attention_pallas(*_jax(*inputs))


def test_race_detector_catches_a_racy_kernel():
    """Control: every parallel step accumulates into the same output block."""
    def kernel(x_ref, o_ref):
        o_ref[...] += x_ref[...]

    racy = pl.pallas_call(
        kernel, grid=(4,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=RACES,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)))
    jax.block_until_ready(racy(jnp.ones((32, 128), jnp.float32)))
    assert races_found()


@pytest.mark.parametrize(("change", "error", "name"), [
    (lambda a: a[:1] + [a[1][..., :8]] + a[2:], ValueError, "v_cache"),
    (lambda a: a[:3] + [a[3].astype(jnp.float32)] + a[4:], TypeError, "block_tables"),
    (lambda a: [a[0][:, :3]] + a[1:], ValueError, "heads"),
])
def test_bad_input(change, error, name):
    args = _jax(*paged_inputs((3, 20), 4, 2, 64, torch.float32))
    with pytest.raises(error, match=name):
        paged_attention_pallas(*change(args))


