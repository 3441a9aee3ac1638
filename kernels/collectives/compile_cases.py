"""`kclub compile` cases of the fused collective kernels (shared/compile_report.py reads this).

Lowered for a 4-device TPU mesh described abstractly (`jax.sharding.AbstractMesh`): jax.export
needs no devices to lower a shard_map, so the remote DMAs, semaphores and the entry barrier go
through the Mosaic TPU lowering from this CPU. Shapes: tensor-parallel decode-ish tiles, TPU
aligned (rows a multiple of 8, columns of 128), fp32 and bf16.
"""

from __future__ import annotations

FAMILY = "collectives"
DEVICES = 4


def pallas_cases() -> list:
    import jax
    import jax.numpy as jnp

    from kernels.collectives import ag_matmul, allreduce_softmax

    mesh = jax.sharding.AbstractMesh((DEVICES,), ("x",))
    S = jax.ShapeDtypeStruct
    cases = []
    for dt in (jnp.float32, jnp.bfloat16):
        tag = jnp.dtype(dt).name
        cases.append((FAMILY, f"ag_matmul 4 devices × 64 rows, 1024→512 {tag}",
                      lambda x, w: ag_matmul(x, w, mesh=mesh),
                      (S((DEVICES * 64, 1024), dt), S((1024, 512), dt))))
        cases.append((FAMILY, f"allreduce_softmax 4 devices, 32 rows × 8192 {tag}",
                      lambda x: allreduce_softmax(x, mesh=mesh),
                      (S((DEVICES * 32, 8192), dt),)))
    return cases
