"""The fused collective kernels (Pallas TPU interpret mode over simulated devices) against
float64 and the unfused lax sequences, race-free under detect_races, with a racy negative
control; their step and byte counts. Runs in a subprocess: the device count must be set before
jax is imported. Interpret mode fills outputs with NaN before a kernel runs (the poison)."""

import json
import os
import subprocess
import sys

import pytest

from kernels.collectives import ag_matmul_counts, allreduce_softmax_counts

CODE = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType
from kernels.collectives import (ag_matmul, ag_matmul_reference, allreduce_softmax,
                                 allreduce_softmax_reference)
from kernels.collectives import races_found as races

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

out = []
for n, m, k, f, v, seed in ((4, 8, 96, 40, 200, 0), (3, 6, 64, 24, 130, 1)):
    mesh = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Auto,))
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (n * m, k), jnp.float32)
    w = jax.random.normal(ks[1], (k, f), jnp.float32)
    # eager: a DMA writes when it starts, so a write that is not ordered after a peer's read
    # is seen whichever thread the simulator runs first ("on_wait" may hide it by luck)
    strict = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    y = ag_matmul(x, w, mesh=mesh, interpret=strict)
    row = {"n": n, "ag_races": races(y)}
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    row["ag_err"] = rel(y, ref)
    row["ag_vs_lax"] = rel(y, ag_matmul_reference(x, w, mesh=mesh))
    r = m - m % n  # rows per device: a multiple of n
    logits = 3 * jax.random.normal(ks[2], (n * r, v), jnp.float32)
    p = allreduce_softmax(logits, mesh=mesh, interpret=strict)
    row["sm_races"] = races(p)
    s = np.asarray(logits, np.float64).reshape(n, r, v).sum(0)
    e = np.exp(s - s.max(-1, keepdims=True))
    want = np.tile(e / e.sum(-1, keepdims=True), (n, 1))
    row["sm_err"] = rel(p, want)
    row["sm_vs_lax"] = rel(p, allreduce_softmax_reference(logits, mesh=mesh))
    row["sm_finite"] = bool(np.isfinite(np.asarray(p)).all())
    if n == 4:  # negative control: without the ready handshake the detector must see a race
        row["racy_races"] = races(ag_matmul(x, w, mesh=mesh, interpret=strict, handshake=False))
    errors = []
    for call in (lambda: ag_matmul(x[0], w, mesh=mesh), lambda: ag_matmul(x[:-1], w, mesh=mesh),
                 lambda: ag_matmul(x, w[1:], mesh=mesh),
                 lambda: allreduce_softmax(logits[:n], mesh=mesh),
                 lambda: ag_matmul(x.astype(jnp.int32), w, mesh=mesh)):
        try:
            call()
            errors.append(None)
        except (ValueError, TypeError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    row["bad_input"] = errors
    out.append(row)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_ag_matmul_equals_all_gather_then_matmul(results):
    for row in results:
        assert row["ag_err"] < 1e-5 and row["ag_vs_lax"] < 1e-5, row
        assert not row["ag_races"], row


def test_allreduce_softmax_equals_psum_then_softmax(results):
    for row in results:
        assert row["sm_finite"] and row["sm_err"] < 1e-5 and row["sm_vs_lax"] < 1e-5, row
        assert not row["sm_races"], row


def test_race_detector_sees_the_missing_handshake(results):
    assert [r["racy_races"] for r in results if "racy_races" in r] == [True]


def test_bad_input_names_the_argument(results):
    for row in results:
        got = row["bad_input"]
        assert got[0].startswith("ValueError: x must be a 2-D array"), got[0]
        assert got[1].startswith("ValueError: x has") and "multiple" in got[1], got[1]
        assert got[2].startswith("ValueError: x (") and "w's rows" in got[2], got[2]
        assert got[3].startswith("ValueError: x has") and "multiple of n" in got[3], got[3]
        assert got[4].startswith("TypeError: x must be floating point"), got[4]


def test_counts():
    c = ag_matmul_counts(4, 64, 1024, 512, 2)
    assert (c.steps_unfused, c.steps_fused) == (7, 4)
    assert c.wire_bytes_fused == c.wire_bytes_unfused == 3 * 64 * 1024 * 2
    assert c.hbm_bytes_unfused == 2 * 4 * 64 * 1024 * 2 and c.hbm_bytes_fused == 0
    s = allreduce_softmax_counts(4, 32, 8192, 4)
    assert s.flops_unfused == 4 * s.flops_fused
    assert s.wire_bytes_fused == s.wire_bytes_unfused == 2 * 3 * 8 * 8192 * 4
