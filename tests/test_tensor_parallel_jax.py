"""The JAX shard_map TP block equals the unsharded block (forward and every gradient) and
issues Megatron's all-reduces: 2 psums forward, 2 more in the gradient. In a subprocess: the
device count must be set before jax is imported."""

import json
import os
import subprocess
import sys

CODE = """
import json
import numpy as np
import torch
from shared.models.llama import Llama, LlamaConfig
from shared.parallel.tensor import jax_tp
torch.manual_seed(SEED)
cfg = LlamaConfig(vocab_size=16, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=72,
                  max_seq_len=32)
block = Llama(cfg).layers[0]
params = jax_tp.from_torch(block)  # GQA 4:2, 13 positions (odd), width 48
rng = np.random.default_rng(SEED)
x = rng.standard_normal((2, 13, 48)).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
with torch.no_grad():
    y_torch = block(torch.from_numpy(x)).numpy()
torch_err = float(np.linalg.norm(np.asarray(jax_tp.block(params, x)) - y_torch)
                  / np.linalg.norm(y_torch))
print(json.dumps({"torch": torch_err, **jax_tp.check(params, x, dy, P)}))
"""


def test_jax_tp_block_equals_unsharded_with_megatrons_psums():
    seed = int.from_bytes(os.urandom(2), "little")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    code = CODE.replace("SEED", str(seed)).replace("P)", "4)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res.pop("psums_forward") == 2
    assert res.pop("psums_grad") == 4         # the forward's 2 (replayed) + the backward's 2
    assert res.pop("psums_grad_implicit_f") == 7  # no explicit f: one psum per use of x
    for what, err in res.items():
        assert err < 1e-5, (what, err, seed)
