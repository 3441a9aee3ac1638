"""ZeRO-3 in JAX (shard_map over 4 simulated devices): the loss and gradients of one device,
and the collectives of the compiled gradient program: ZeRO-3's 2 gathers per weight and one
reduce-scatter with regathering, ZeRO-2's 1 and 1 without. Runs in a subprocess: the device
count must be set before jax is imported, and another test may have imported it already."""

import json
import os
import subprocess
import sys

import pytest

CODE = """
import json
from shared.parallel.zero.jax_zero import check
print(json.dumps([check(n=4, b=8, d=12, h=20, seed=3),
                  check(n=4, b=8, d=12, h=20, seed=4, regather=False)]))
"""


def test_jax_zero3_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    regather, keep = json.loads(out.stdout.strip().splitlines()[-1])
    for res in (regather, keep):
        for what in ("loss", "grad_w1", "grad_w2"):
            assert res[what] < 1e-5, (what, res)
        assert res["reduce_scatters"] == 2 and res["all_reduces"] == 1  # grads; the loss mean
    assert regather["all_gathers"] == 4 and keep["all_gathers"] == 2


def test_jax_zero3_bad_sizes():
    from shared.parallel.zero.jax_zero import check

    with pytest.raises(ValueError, match="d=10 must be a multiple"):
        check(n=4, d=10)
