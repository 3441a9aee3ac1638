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

    from kernels.megakernel.persistent_triton import TASK_WIDTH, gpu_blocks, launch

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
        blocks = gpu_blocks(dtype, head_dim, group)   # what MegakernelDecoder picks on a GPU
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


def _decode_task_counts(B, L, D, F, V, H, Hkv, hd, tile) -> tuple[int, int, int]:
    """(tasks, events, signals at most) of build_decode_graph's step for these sizes: the table
    shapes the lowering needs (kernels import nothing from shared/, so counted here)."""
    qkv, o, ffn, head = (H + 2 * Hkv) * hd // tile, D // tile, F // tile, -(-V // tile)
    per_layer = 2 + qkv + 2 * B * Hkv + 2 * o + ffn + 2 * o      # norms, tiles, rope+attn, adds
    tasks = 1 + L * per_layer + 1 + head + 1
    events = 1 + L * (B * Hkv + 7 + 2 * o) + 3
    return tasks, events, 2 * tasks


def pallas_cases() -> list:
    """The Pallas whole-step worker loop on 2 TensorCores (v4/v5p megacore) at Qwen3-8B's widths
    (d=4096, ffn 12288, 32/8 heads of 128, 151 936-token vocabulary, bf16 weights and cache,
    4096 positions) in 128-column tiles, two layers deep, with tables of the graph's sizes
    (lowering reads shapes, not values). 36 layers would only lengthen the tables, which sit in
    SMEM: ~100 K words there, more than a TensorCore's scalar memory holds (the GPU kernel reads
    its table from global memory instead)."""
    import jax
    import jax.numpy as jnp

    from kernels.megakernel.persistent_pallas import TABLES, WEIGHTS, decode_step_pallas

    S = jax.ShapeDtypeStruct
    B, L, cores, tile, seq = 8, 2, 2, 128, 4096
    D, F, V, H, Hkv, hd = 4096, 12288, 151_936, 32, 8, 128
    tasks, events, signals = _decode_task_counts(B, L, D, F, V, H, Hkv, hd, tile)
    n_qkv, vp, bf16 = (H + 2 * Hkv) * hd, -(-V // tile) * tile, jnp.bfloat16
    tables = {"OP": (tasks,), "ARG": (tasks, 4), "WAIT": (tasks,), "NEED": (tasks,),
              "QUEUE": (cores, -(-tasks // cores)), "QLEN": (cores,), "SIG_START": (tasks + 1,),
              "SIG_EVENT": (signals,), "SIG_CORE": (signals,), "TOK": (B,), "POS": (B,)}
    weights = {"embed": (V, D), "norms": (2 * L + 1, 1, D), "wqkv": (L, D, n_qkv),
               "wo": (L, D, D), "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
               "lm_head": (1, D, vp), "cos": (seq, hd), "sin_signed": (seq, hd)}
    dims = {"B": B, "D": D, "F": F, "V": V, "Vp": vp, "H": H, "Hkv": Hkv, "head_dim": hd,
            "group": H // Hkv, "tile": tile, "S": seq, "sm_scale": hd ** -0.5}

    def run(*flat):
        tabs = dict(zip(TABLES, flat[:len(TABLES)], strict=True))
        ws = dict(zip(WEIGHTS, flat[len(TABLES):-2], strict=True))
        k_ref, v_ref = jax.new_ref(flat[-2]), jax.new_ref(flat[-1])
        return decode_step_pallas(tabs, ws, k_ref, v_ref, dims=dims, cores=cores,
                                  n_events=events, eps=1e-6)

    cache = S((L, B, Hkv, seq, hd), bf16)
    args = (*(S(tables[k], jnp.int32) for k in TABLES),
            *(S(weights[k], jnp.float32 if k in ("cos", "sin_signed") else bf16)
              for k in WEIGHTS), cache, cache)
    return [(FAMILY, f"decode_step_pallas 2 cores, Qwen3-8B widths, {L} layers, B={B}, "
             f"tile {tile}, bf16", run, args)]
