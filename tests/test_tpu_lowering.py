"""The Pallas kernels lower for the real hardware, checked from this CPU (docs/compile.md,
"How"): Mosaic TPU for every public Pallas function, forward and gradients, f32 and bf16, at
shapes that are not multiples of the blocks; and the GPU path takes the Triton lowering, not
Mosaic GPU. Lowering needs KC_INTERPRET=0 before the kernels are built, so it runs in a fresh
process, on JAX's CPU backend even on a GPU host (where the kernels would otherwise pick the GPU
target); the pytest process itself stays in interpret mode. Also conftest's tpu_interpret_on_cpu
on a simulated GPU host."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.device import pallas_interpret
from kernels.moe.grouped_matmul_pallas import grouped_matmul_pallas
from kernels.paged import rope_pallas, rope_reference
from kernels.tpu_lowering import check_gpu_blocks, lower_for_tpu, pallas_target, vmem_blocks
from shared.check import assert_close

F32 = jnp.float32


def _copy(x_ref, *refs, scratch: int):   # o = x; the other operands and scratch take VMEM only
    refs[-1 - scratch][...] = x_ref[...]


def hand_counted():
    """(name, fn, args, VMEM bytes counted by hand): each operand kind the count tells apart."""
    S = jax.ShapeDtypeStruct   # an (8, 128) f32 tile is 4096 B

    def no_grid(x):   # no grid, no pipeline: in and out once each, plus the scratch
        spec = pl.BlockSpec(memory_space=pltpu.VMEM)
        return pl.pallas_call(functools.partial(_copy, scratch=2), in_specs=[spec],
                              out_specs=spec, out_shape=x,
                              scratch_shapes=[pltpu.VMEM((8, 128), F32), pltpu.SemaphoreType.DMA],
                              interpret=pallas_interpret())(x)

    def grid(x, single, whole, hbm, smem):
        tiled = lambda **kw: pl.BlockSpec((8, 128), lambda i: (i, 0), **kw)  # noqa: E731
        return pl.pallas_call(
            functools.partial(_copy, scratch=1), grid=(2,), out_shape=S((16, 128), F32),
            in_specs=[tiled(),                                      # 2 × 4096
                      tiled(pipeline_mode=pl.Buffered(1)),          # 1 × 4096
                      pl.BlockSpec((16, 128), lambda i: (0, 0)),    # trivial: 1 × 8192
                      pl.BlockSpec(memory_space=pl.ANY),            # stays in HBM: 0
                      pl.BlockSpec(memory_space=pltpu.SMEM)],       # SMEM: 0
            out_specs=tiled(),                                      # 2 × 4096
            scratch_shapes=[pltpu.VMEM((8, 128), jnp.bfloat16)],   # 2048
            interpret=pallas_interpret())(x, single, whole, hbm, smem)

    def on_cores(x):   # pl.kernel: operands stay in HBM (ANY), the kernel copies via scratch
        def body(x_hbm, o_hbm, buf, smem, sem):
            pltpu.sync_copy(x_hbm, buf)
            pltpu.sync_copy(buf, o_hbm)
        return pl.kernel(body, S(x.shape, x.dtype),
                         mesh=pltpu.create_tensorcore_mesh("core", num_cores=1),
                         scratch_types=[pltpu.VMEM((16, 128), F32), pltpu.SMEM((4,), jnp.int32),
                                        pltpu.SemaphoreType.DMA(())],
                         interpret=pallas_interpret())(x)

    return [("hand no grid", no_grid, (S((16, 128), F32),), 2 * 8192 + 4096),
            ("hand pl.kernel", on_cores, (S((16, 128), F32),), 8192),
            ("hand grid", grid, (S((16, 128), F32), S((16, 128), F32), S((16, 128), F32),
                                 S((64, 128), F32), S((4,), jnp.int32)),
             2 * 4096 + 4096 + 8192 + 2 * 4096 + 2048)]

_KERNELS = """
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from kernels.attention import flash_attention_pallas
from kernels.moe.grouped_matmul_pallas import grouped_matmul_pallas
from kernels.softmax import softmax_pallas

S = jax.ShapeDtypeStruct
SIZES = jnp.array([100, 0, 151, 40], jnp.int32)   # 291 rows of 300: ragged groups, spare rows


def grads(f):  # every input's cotangent, through the kernels' custom_vjp backward
    def pulled(*args):
        out, pull = jax.vjp(f, *args)
        return pull(out)
    return pulled


def attention(causal):
    return lambda q, k, v: flash_attention_pallas(q, k, v, causal=causal)


def cases(dt):  # (name, fn, args): odd sizes, GQA, head_dim 40 (padded to 64)
    qkv = (S((1, 4, 100, 40), dt), S((1, 2, 77, 40), dt), S((1, 2, 77, 40), dt))
    gmm = lambda x, w: grouped_matmul_pallas(x, w, SIZES)
    return [
        ("softmax", softmax_pallas, (S((37, 1000), dt),)),
        ("softmax_3d_axis1", lambda x: softmax_pallas(x, 1), (S((5, 300, 7), dt),)),
        ("flash_fwd", attention(False), qkv),
        ("flash_causal_grads", grads(attention(True)), qkv),
        ("grouped_matmul", gmm, (S((300, 64), dt), S((4, 64, 200), dt))),
        ("grouped_matmul_grads", grads(gmm), (S((300, 64), dt), S((4, 64, 200), dt))),
    ]
"""

_TPU = _KERNELS + """
import json, sys
from kernels.tpu_lowering import lower_for_tpu
sys.path.insert(0, "tests")
from test_tpu_lowering import hand_counted


def bad_block(x):  # (5, 100): neither a multiple of (8, 128) nor the array's (64, 256)
    spec = pl.BlockSpec((5, 100), lambda i: (i, 0))
    return pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] * 2),
                          grid=(2,), in_specs=[spec], out_specs=spec,
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


records = [lower_for_tpu(fn, *args, name=f"{name} {dt.__name__}")
           for dt in (jnp.float32, jnp.bfloat16) for name, fn, args in cases(dt)]
records.append(lower_for_tpu(bad_block, S((64, 256), jnp.float32), name="bad_block"))
records += [lower_for_tpu(fn, *args, name=name) for name, fn, args, _ in hand_counted()]
print(json.dumps(records))
"""

_GPU = _KERNELS + """
import json
no_compat = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
out = {}
for dt in (jnp.float32, jnp.bfloat16):
    for name, fn, args in cases(dt):
        key = f"{name} {dt.__name__}"
        try:
            text = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                     disabled_checks=no_compat)(*args).mlir_module()
            out[key] = {"triton": "xla.gpu.triton" in text, "mosaic_gpu": "mosaic_gpu" in text}
        except Exception as err:
            out[key] = {"error": f"{type(err).__name__}: {err}"[:300]}
print(json.dumps(out))
"""


def _run(script: str, **env) -> object:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120,
                          env={**os.environ, "KC_INTERPRET": "0", "JAX_PLATFORMS": "cpu", **env},
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tpu_records():
    return {r["name"]: r for r in _run(_TPU)}


def test_every_pallas_kernel_lowers_for_tpu_and_a_bad_block_does_not(tpu_records):
    records = {k: r for k, r in tpu_records.items() if not k.startswith("hand ")}
    bad = records.pop("bad_block")
    assert len(records) == 12
    for name, r in records.items():
        assert r["status"] == "ok", f"{name}: {r['status'][:1500]}"
        assert r["tpu_custom_call"], f"{name}: no Mosaic kernel in the module (interpret mode?)"
        assert r["pallas_calls"] and r["fits_vmem"], f"{name}: {r['pallas_calls']}"
    # forward + dK/dV + dQ: three kernels with blocks; the gradient holds no N² array
    calls = records["flash_causal_grads bfloat16"]["pallas_calls"]
    assert [c["kernel"] for c in calls] == ["flash_fwd", "flash_bwd_dkdv", "flash_bwd_dq"]
    # the check can fail: Mosaic's (8, 128) rule rejects the (5, 100) block
    assert bad["status"] != "ok" and "divisible by 8 and 128" in bad["status"], bad["status"]
    assert not bad["tpu_custom_call"]


def test_vmem_bytes_count_double_buffered_blocks(tpu_records):
    records = tpu_records
    # softmax (37, 1000) f32: column block 1024 → block_m = max(8, 8192 // 1024) = 8.
    # stats: x tile 8×1024×4 + m, d 2 × 8×1×4 = 32832 B; normalise adds the output tile.
    calls = {c["kernel"]: c for c in records["softmax float32"]["pallas_calls"]}
    assert calls["softmax_stats"]["block_bytes"] == 8 * 1024 * 4 + 2 * 8 * 4
    assert calls["softmax_normalise"]["block_bytes"] == 2 * 8 * 1024 * 4 + 2 * 8 * 4
    assert calls["softmax_stats"]["vmem_bytes"] == 2 * calls["softmax_stats"]["block_bytes"]


@pytest.mark.parametrize("case", hand_counted(), ids=lambda c: c[0])
def test_vmem_bytes_as_counted_by_hand(case):
    """Blocks double-buffered only under a grid, a trivial window or Buffered(1) once, ANY and
    SMEM operands and semaphores not in VMEM, VMEM scratch once, pl.kernel's too
    (hand_counted's comments)."""
    name, fn, args, expected = case
    [call] = vmem_blocks(fn, *args)
    assert call["vmem_bytes"] == expected, call


def test_hand_counted_kernels_lower_as_counted(tpu_records):
    """The hand-counted kernels are ones Mosaic accepts, and lower_for_tpu reports the count."""
    for name, _, _, expected in hand_counted():
        r = tpu_records[name]
        assert r["status"] == "ok" and r["tpu_custom_call"], f"{name}: {r['status'][:1500]}"
        assert r["vmem_bytes"] == expected, r


def test_gpu_path_takes_the_triton_lowering():
    out = _run(_GPU, KC_PALLAS_TARGET="gpu")
    for name, r in out.items():
        if name.startswith("grouped_matmul"):   # TPU-only kernel: refused by name on a GPU
            assert "RuntimeError: grouped_matmul_pallas is a TPU kernel" in r["error"]
        else:
            assert r.get("triton") and not r.get("mosaic_gpu"), f"{name}: {r}"


@pytest.mark.usefixtures("tpu_interpret_on_cpu")   # interpret mode on a GPU host too
def test_lower_for_tpu_refuses_interpret_mode():
    with pytest.raises(RuntimeError, match="KC_INTERPRET=0"):
        lower_for_tpu(lambda x: x, name="anything")


def test_gpu_blocks_must_be_powers_of_two():
    check_gpu_blocks("gpu", block_m=64, head_dim=128)
    check_gpu_blocks("tpu", block_m=24)     # Mosaic has its own (8, 128) rule instead
    with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
        check_gpu_blocks("gpu", block_m=24)


def test_tpu_interpret_on_cpu_on_a_simulated_gpu_host(monkeypatch, request):
    """JAX's default backend says "gpu", as on the H200: the kernels pick the Triton lowering
    and compile (what failed there). Inside conftest's fixture they interpret the TPU variant
    on the CPU device, correctly; a test that asks for the GPU target still gets the refusal."""
    for name in ("KC_INTERPRET", "KC_PALLAS_TARGET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not pallas_interpret() and pallas_target() == "gpu"
    request.getfixturevalue("tpu_interpret_on_cpu")
    assert pallas_interpret() and pallas_target() == "tpu"
    x = np.random.default_rng(0).standard_normal((37, 3, 80)).astype(np.float32)
    pos = np.arange(37, dtype=np.int32) * 7
    out = rope_pallas(jnp.asarray(x), jnp.asarray(pos))
    assert out.devices() == {jax.devices("cpu")[0]}
    assert_close(out, rope_reference(torch.tensor(x, dtype=torch.float64), torch.tensor(pos)),
                 tol=1e-5, what="rope_pallas in the fixture")
    monkeypatch.setenv("KC_PALLAS_TARGET", "gpu")
    with pytest.raises(RuntimeError, match="grouped_matmul_pallas is a TPU kernel"):
        grouped_matmul_pallas(jnp.zeros((8, 16)), jnp.zeros((2, 16, 8)), jnp.array([3, 5]))
