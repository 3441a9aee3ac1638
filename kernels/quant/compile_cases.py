"""`kclub compile` cases of the quantized matmuls (shared/compile_report.py reads this file).

Shapes are Llama-7B's MLP: up/gate K = 4096 -> N = 11008 and down 11008 -> 4096, at decode
(M = 1 and 2: the split-K gemv kernel; a ragged 13: the decode config's 16-row tile, split-K
too) and prefill (M = 509: the 128-row tiles' ragged edge). Each decode case compiles the
split-K reduction as well. Main cases are the 16-bit inputs the labs' `full` scale runs; fp32
(TF32 on a GPU) is compiled too, for one format, and may spill.
"""

from __future__ import annotations

import functools

FAMILY = "quant"
# (format, group): weight-only int8, LLM.int8 (int8 x int8), GPTQ-style int4 at g=128, NF4 with
# and without double quantization
CASE_FORMATS = (("int8", None), ("llm.int8", None), ("int4", 128), ("nf4", 64), ("nf4 no-dq", 64))


@functools.cache
def _weight(fmt: str, n: int, k: int):
    import torch

    from kernels.quant import quantize

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    name = fmt.split()[0]
    group = 64 if name == "nf4" else (128 if name == "int4" else None)
    return quantize(w, name, group_size=group, double_quant=not fmt.endswith("no-dq"))


def triton_cases(add, dtypes) -> None:
    import torch

    from kernels.quant import quantized_matmul

    def run(fmt, m, n, k, dt):
        def go():
            x = torch.randn(m, k, dtype=dtypes[dt])
            if fmt == "llm.int8":
                x[:, 7] = 20.0       # an outlier column: the decomposition's 16-bit half runs
            quantized_matmul(x, _weight(fmt, n, k))
        return go

    # every format in fp16; bf16 (another tl.dot) and fp32 (TF32, may spill) for the 4-bit ones
    chosen = {"fp16": CASE_FORMATS, "bf16": CASE_FORMATS[2:4], "fp32": CASE_FORMATS[2:3]}
    for dt, formats in chosen.items():
        for fmt, _ in formats:
            # gemv (16-bit only: main), decode (16-row tile, ragged), prefill (ragged)
            for m in (1, 13, 509) if dt != "fp32" else (13, 509):
                add(FAMILY, f"quantized_matmul {fmt} M={m} 4096→11008", dt, dt != "fp32",
                    run(fmt, m, 11008, 4096, dt))
    add(FAMILY, "quantized_matmul int4 M=2 4096→11008", "fp16", True,   # gemv, 2-row tile
        run("int4", 2, 11008, 4096, "fp16"))
    for m in (1, 13):
        add(FAMILY, f"quantized_matmul int4 M={m} 11008→4096 (down)", "fp16", True,
            run("int4", m, 4096, 11008, "fp16"))


def pallas_cases():
    """(family, name, fn, ShapeDtypeStructs): the Pallas kernel's jitted body at the same
    shapes (K = 4096, N = 11008), decode (M = 13) and prefill (M = 509), f32 and bf16."""
    import functools

    import jax
    import jax.numpy as jnp

    from kernels.quant.matmul_pallas import _call

    S = jax.ShapeDtypeStruct
    k, n = 4096, 11008
    cases = []
    for dt in (jnp.float32, jnp.bfloat16):
        tag = jnp.dtype(dt).name
        for m, tm in ((13, 8), (509, 128)):
            ops = {
                "int8": (S((m, k), dt), S((k, n), jnp.int8), S((1, n), jnp.float32), None),
                "llm.int8": (S((m, k), jnp.int8), S((k, n), jnp.int8), S((1, n), jnp.float32),
                             S((m, 1), jnp.float32)),
                "int4": (S((m, k), dt), S((k // 8, n), jnp.int32), S((k // 128, n), jnp.float16),
                         S((k // 128, n), jnp.int32)),
                "nf4": (S((m, k), dt), S((k // 8, n), jnp.int32), S((k // 64, n), jnp.float32),
                        None),
            }
            for fmt, args in ops.items():
                group = {"int4": 128, "nf4": 64}.get(fmt)
                out = jnp.float32 if fmt == "llm.int8" else dt
                fn = functools.partial(_call, fmt=fmt, group=group, tm=tm, tn=128,
                                       out_dtype=out)
                if args[3] is None:
                    fn = functools.partial(lambda x, d, s, f: f(x, d, s, None), f=fn)
                    args = args[:3]
                cases.append((FAMILY, f"quantized_matmul_pallas {fmt} M={m} {tag}", fn, args))
    return cases
