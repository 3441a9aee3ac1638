"""`kclub compile --family megakernel`: the persistent kernel built for sm_80/sm_90 at the
block sizes its launcher picks on a GPU — the tiny Llama (head_dim 32, GQA group 2) and a
Qwen3-8B-like step (head_dim 128, group 4: 32 query heads over 8 KV heads) — in each dtype.

Compilation depends only on dtypes and the constexpr blocks (sizes are runtime arguments), so
the cases pass small stand-in tensors: nothing is launched under kernels.device.compile_only.
"""

from __future__ import annotations

FAMILY = "megakernel"


def _persistent(dtype, head_dim: int, group: int):
    import torch

    from kernels.megakernel.persistent_triton import TASK_WIDTH, launch

    def run():
        n = 8
        tables = {"TASKS": torch.full((n, int(TASK_WIDTH)), -1, dtype=torch.int64),
                  "EVENTS": torch.zeros(n, dtype=torch.int32),
                  "ERR": torch.zeros(1, dtype=torch.int32)}
        w = torch.zeros(4096, dtype=dtype)
        state = {"WS": torch.zeros(4096), "W": w, "KC": w.clone(), "VC": w.clone(),
                 "COS": torch.zeros(4096), "SIN": torch.zeros(4096),
                 "TOK": torch.zeros(16, dtype=torch.int64),
                 "OUT": torch.zeros(16, dtype=torch.int64),
                 "POS": torch.zeros(16, dtype=torch.int64), "batch": 7, "head_dim": head_dim,
                 "eps": 1e-6, "sm_scale": head_dim ** -0.5}
        blocks = {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_G": max(16, group), "BLOCK_S": 32,
                  "BLOCK_D": max(16, head_dim)}
        launch(tables, state, queue=torch.arange(n, dtype=torch.int32),
               qstart=torch.tensor([0, n // 2, n], dtype=torch.int32), epoch=3,
               max_spins=10_000_000, blocks=blocks)
    return run


def triton_cases(add, dtypes) -> None:
    for dt, dtype in dtypes.items():
        main = dt != "fp32"
        add(FAMILY, "persistent decode step, tiny Llama (d=32, GQA 2)", dt, main,
            _persistent(dtype, 32, 2))
        add(FAMILY, "persistent decode step, Qwen3-8B-like (d=128, GQA 32/8)", dt, main,
            _persistent(dtype, 128, 4))


def pallas_cases() -> list:
    """The Pallas worker loop on 2 TensorCores (v4/v5p megacore) at Qwen3-8B's MLP width in
    128-column tiles, its schedule a stand-in of the right shapes (lowering reads no values)."""
    import jax
    import jax.numpy as jnp

    from kernels.megakernel.persistent_pallas import TABLES, mlp_persistent_pallas

    S = jax.ShapeDtypeStruct
    B, D, F, tile, cores, tasks, signals, events = 8, 4096, 12288, 128, 2, 225, 400, 100
    shapes = {"OP": (tasks,), "COL": (tasks,), "WAIT": (tasks,), "NEED": (tasks,),
              "QUEUE": (cores, tasks), "QLEN": (cores,), "SIG_START": (tasks + 1,),
              "SIG_EVENT": (signals,), "SIG_CORE": (signals,)}

    def run(x, wn, wg, wu, wd, *tables):
        return mlp_persistent_pallas(dict(zip(TABLES, tables, strict=True)), x, wn, wg, wu, wd,
                                     cores=cores, tile=tile, eps=1e-6, n_events=events)

    args = (S((B, D), jnp.float32), S((1, D), jnp.float32), S((D, F), jnp.float32),
            S((D, F), jnp.float32), S((F, D), jnp.float32),
            *(S(shapes[k], jnp.int32) for k in TABLES))
    return [(FAMILY, "mlp_persistent_pallas 2 cores D=4096 F=12288 tile 128 float32", run,
             args)]
