"""The JAX pipeline (shard_map + ppermute over simulated devices) equals the unpipelined
computation, forward and gradients. Runs in a subprocess: the device count must be set
before jax is imported, and another test may have imported it already."""

import json
import os
import subprocess
import sys

import pytest

CODE = """
import json
from shared.parallel.pipeline.jax_pipeline import check
print(json.dumps([check(p=4, m=5, b=3, d=12, h=20, seed=1)]))
"""


def test_jax_pipeline_equals_unpipelined():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for errors in json.loads(out.stdout.strip().splitlines()[-1]):
        assert set(errors) == {"forward", "grad_w1", "grad_w2", "grad_x"}
        for what, err in errors.items():
            assert err < 1e-5, (what, err)


def test_jax_pipeline_needs_enough_devices():
    from shared.parallel.pipeline.jax_pipeline import make_mesh
    with pytest.raises(ValueError, match="need 64 devices"):
        make_mesh(64)
