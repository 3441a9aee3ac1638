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


def pallas_cases() -> list:
    """The Pallas whole-step worker loop on 2 TensorCores (v4/v5p megacore) at Qwen3-8B's widths
    (d=4096, ffn 12288, 32/8 heads of 128, 151 936-token vocabulary, bf16 weights and cache,
    4096 positions) in 128-column tiles, two layers deep: its tables are the real graph's,
    dealt to 2 cores (lowering reads shapes, not values). 36 layers would only lengthen the
    tables, which sit in SMEM: ~100 K words there, more than a TensorCore's scalar memory holds
    (the GPU kernel reads its table from global memory instead)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from kernels.megakernel.persistent_pallas import TABLES, WEIGHTS, decode_step_pallas
    from shared.benchmarks.megakernel import QWEN3_8B
    from shared.megakernel.graph import build_decode_graph
    from shared.megakernel.pallas_decode import pallas_tables
    from shared.megakernel.schedule import assign

    S = jax.ShapeDtypeStruct
    B, L, cores, tile, seq = 8, 2, 2, 128, 4096
    c = dataclasses.replace(QWEN3_8B, n_layers=L)
    graph = build_decode_graph(c, B, tile=tile, seq_len=seq)
    tables = pallas_tables(graph, assign(graph, cores))
    hd, n_qkv, bf16 = c.head_dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, jnp.bfloat16
    vp = -(-c.vocab_size // tile) * tile
    weights = {"embed": (c.vocab_size, c.dim), "norms": (2 * L + 1, 1, c.dim),
               "wqkv": (L, c.dim, n_qkv), "wo": (L, c.dim, c.dim),
               "w_gate": (L, c.dim, c.ffn_dim), "w_up": (L, c.dim, c.ffn_dim),
               "w_down": (L, c.ffn_dim, c.dim), "lm_head": (1, c.dim, vp), "cos": (seq, hd),
               "sin_signed": (seq, hd)}
    dims = {"B": B, "D": c.dim, "F": c.ffn_dim, "V": c.vocab_size, "Vp": vp, "H": c.n_heads,
            "Hkv": c.n_kv_heads, "head_dim": hd, "group": c.n_heads // c.n_kv_heads,
            "tile": tile, "S": seq, "sm_scale": hd ** -0.5}

    def run(*flat):
        tabs = dict(zip(TABLES, flat[:len(TABLES)], strict=True))
        ws = dict(zip(WEIGHTS, flat[len(TABLES):-2], strict=True))
        k_ref, v_ref = jax.new_ref(flat[-2]), jax.new_ref(flat[-1])
        return decode_step_pallas(tabs, ws, k_ref, v_ref, dims=dims, cores=cores,
                                  n_events=len(graph["events"]), eps=1e-6)

    cache = S((L, B, c.n_kv_heads, seq, hd), bf16)
    args = (*(S(tables[k].shape if k in tables else (B,), jnp.int32) for k in TABLES),
            *(S(weights[k], jnp.float32 if k in ("cos", "sin_signed") else bf16)
              for k in WEIGHTS), cache, cache)
    return [(FAMILY, f"decode_step_pallas 2 cores, Qwen3-8B widths, {L} layers, B={B}, "
             f"tile {tile}, bf16", run, args)]
