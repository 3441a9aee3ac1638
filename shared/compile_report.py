"""`kclub compile`: every public kernel built for the real hardware from this CPU.

Triton kernels are compiled for sm_80 (A100) and sm_90 (H100) through their own launchers
(kernels.device.compile_only: same tiles, warps and stages as on a GPU), and ptxas reports
registers and spills; Pallas kernels are lowered for TPU with jax.export (kernels.tpu_lowering).
Cases are the labs' shapes: their head dims, vocabularies and expert counts, in fp16, bf16 and
fp32, at sizes that are not multiples of the blocks (ragged edges specialise differently).

A kernel fails when it does not compile or lower, when its shared memory passes the part's limit,
or when it spills in a *main* case (16-bit inputs: what the labs' `full` scale runs on a GPU).
Spills that are accepted elsewhere are listed in ACCEPTED_SPILLS with the reason beside them.
A kernel package may declare its own family in kernels/<package>/compile_cases.py (FAMILY, and
`triton_cases(add, dtypes)` and/or `pallas_cases()`, shaped like the functions below), so a new
family is added beside its kernels without editing this file.
Needs KC_INTERPRET=0 before `import kernels`: `main` re-runs itself in a subprocess otherwise.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GPU_TARGETS = ("sm_80", "sm_90")
ALL_TARGETS = (*GPU_TARGETS, "tpu")

# (kernel, target, dtype) -> why a spill there is accepted. Empty: none are, today.
ACCEPTED_SPILLS: dict[tuple[str, str, str], str] = {}


@dataclass(frozen=True)
class Case:
    """One call of a public function at one shape and dtype; `main` cases may not spill."""

    family: str
    label: str
    dtype: str
    main: bool
    run: Callable[[], object]


def _torch_cases() -> list[Case]:
    import torch

    from kernels.attention import flash_attention, standard_attention
    from kernels.moe import grouped_matmul, permute, unpermute
    from kernels.sampling import gumbel_sample, speculative_accept
    from kernels.softmax import safe_softmax, softmax

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    cases: list[Case] = []

    def add(family, label, dt, main, fn):
        cases.append(Case(family, label, dt, main, fn))

    def attention(fn, b, h, hkv, n, d, causal, dt):
        def run():
            q = torch.randn(b, h, n, d, dtype=dtypes[dt], requires_grad=True)
            k = torch.randn(b, hkv, n, d, dtype=dtypes[dt], requires_grad=True)
            v = torch.randn(b, hkv, n, d, dtype=dtypes[dt], requires_grad=True)
            fn(q, k, v, causal=causal).sum().backward()
        return run

    for dt in dtypes:
        main = dt != "fp32"
        # the tilings kernels/softmax/tiling.py picks: many short rows per tile (4096×128), one
        # tile per row (256×1000; 64×4096, the widest, 8 warps in fp16 and 16 in fp32), rows
        # swept in tiles of 1024 (2048×50000: 8 rows per program; 4×50000: 1, as in decoding).
        # torch.empty: compiled, never run, so the values are never read
        for n_rows, n_cols in ((4096, 128), (256, 1000), (64, 4096), (2048, 50_000), (4, 50_000)):
            for fn in (softmax, safe_softmax):
                add("softmax", f"{fn.__name__} {n_rows}×{n_cols}", dt, main,
                    lambda fn=fn, r=n_rows, n=n_cols, dt=dt: fn(torch.empty(r, n,
                                                                          dtype=dtypes[dt])))
        # head dims of the labs (64: GPT-2 medium; 128: Llama), GQA, causal (bottom-right)
        for d in (64, 128):
            add("attention", f"flash fwd+bwd d={d} N=1000 causal GQA 8/2", dt, main,
                attention(flash_attention, 2, 8, 2, 1000, d, True, dt))
        add("attention", "standard fwd+bwd d=64 N=1000", dt, main,
            attention(standard_attention, 1, 2, 2, 1000, 64, False, dt))
        add("moe", "grouped_matmul fwd+bwd E=8 4096→14336 (Mixtral)", dt, main,
            _grouped(grouped_matmul, 8, 4096, 14336, dtypes[dt]))
    add("attention", "flash fwd+bwd d=64 N=1024 H=16 (GPT-2 medium, full)", "fp16", True,
        attention(flash_attention, 1, 16, 16, 1024, 64, False, "fp16"))
    # the GPU benchmark's d = 128 rows (MHA, not causal: the kernels' unmasked loops alone)
    add("attention", "flash fwd+bwd d=128 N=1024 H=16 (FA2 benchmark, full)", "fp16", True,
        attention(flash_attention, 1, 16, 16, 1024, 128, False, "fp16"))
    add("moe", "grouped_matmul fwd+bwd E=64 2048→1408 (DeepSeek-V2-Lite)", "bf16", True,
        _grouped(grouped_matmul, 64, 2048, 1408, torch.bfloat16))
    add("moe", "permute + unpermute top-2 of 8, D=4096", "bf16", True,
        lambda: _permute(permute, unpermute, torch.bfloat16))
    _paged_cases(add, dtypes)
    for module in case_modules():
        if hasattr(module, "triton_cases"):
            module.triton_cases(add, dtypes)
    for v in (256, 32_000, 128_256):  # the labs' byte vocabulary, Llama 2, Llama 3
        add("sampling", f"gumbel_sample V={v}", "fp32", True,
            lambda v=v: gumbel_sample(torch.randn(4, v), temperature=0.8))
        add("sampling", f"gumbel_sample greedy V={v}", "bf16", True,
            lambda v=v: gumbel_sample(torch.randn(4, v, dtype=torch.bfloat16), temperature=0))
        add("sampling", f"speculative_accept γ=4 V={v}", "fp32", True,
            lambda v=v: _accept(speculative_accept, 4, v))
    return cases


def _paged_cases(add, dtypes) -> None:
    """Paged decode attention (Llama-3-8B heads: GQA 32/8 at d=128; MHA d=64; MQA at the padded
    d=80; split in 4, and unsplit, where stage 1 writes the output), RoPE and the fused cache
    write, at ragged token counts."""
    import torch

    from kernels.paged import rope, rope_cache_write, rope_cache_write_unfused
    from kernels.paged.paged_attention_triton import paged_attention

    def attention(hq, hkv, d, dt, splits):
        def run():
            q = torch.randn(4, hq, d, dtype=dtypes[dt])
            k = torch.randn(300, 16, hkv, d, dtype=dtypes[dt])
            tables = torch.randint(0, 300, (4, 70), dtype=torch.int32)
            lens = torch.tensor([1, 513, 17, 1111], dtype=torch.int32)
            paged_attention(q, k, k.clone(), tables, lens, num_splits=splits,
                            check_inputs=False)
        return run

    def write(fn, dt):
        def run():
            q, k = torch.randn(37, 32, 128, dtype=dtypes[dt]), torch.randn(37, 8, 128,
                                                                         dtype=dtypes[dt])
            cache = torch.empty(20, 16, 8, 128, dtype=dtypes[dt])
            fn(q, k, k.clone(), torch.arange(37), torch.arange(37, dtype=torch.int32), cache,
               cache.clone())
        return run

    for dt in dtypes:
        main = dt != "fp32"
        for hq, hkv, d in ((32, 8, 128), (8, 8, 64), (8, 1, 80)):
            add("paged", f"paged_attention split-K 4 Hq/Hkv={hq}/{hkv} d={d}", dt, main,
                attention(hq, hkv, d, dt, 4))
        add("paged", "paged_attention 1 split (no merge) Hq/Hkv=32/8 d=128", dt, main,
            attention(32, 8, 128, dt, 1))
        add("paged", "rope fwd+bwd 37×32×128", dt, main,
            lambda dt=dt: rope(torch.randn(37, 32, 128, dtype=dtypes[dt], requires_grad=True),
                               torch.arange(37)).sum().backward())
        add("paged", "rope_cache_write 37 tokens 32/8 d=128", dt, main,
            write(rope_cache_write, dt))
        add("paged", "rope_cache_write_unfused 37 tokens 32/8 d=128", dt, main,
            write(rope_cache_write_unfused, dt))


def _grouped(fn, e, k, n, dtype):
    import torch

    def run():
        sizes = torch.full((e,), 37, dtype=torch.int64)   # 37 rows per expert: ragged tiles
        x = torch.randn(int(sizes.sum()), k, dtype=dtype, requires_grad=True)
        w = torch.randn(e, k, n, dtype=dtype, requires_grad=True)
        fn(x, w, sizes).sum().backward()
    return run


def _permute(permute, unpermute, dtype):
    import torch

    x = torch.randn(1000, 4096, dtype=dtype)
    experts = torch.stack([torch.randperm(8)[:2] for _ in range(1000)])
    x_sorted, _, positions = permute(x, experts, 8)
    unpermute(x_sorted, positions, torch.full((1000, 2), 0.5, dtype=dtype))


def _accept(fn, gamma, v):
    import torch

    p = torch.softmax(torch.randn(2, gamma + 1, v), -1)
    q = torch.softmax(torch.randn(2, gamma, v), -1)
    fn(torch.randint(0, v, (2, gamma)), q, p, check_inputs=False)


def compile_triton(targets=GPU_TARGETS, families=None, progress: bool = True) -> list[dict]:
    """One row per (case, target, compiled kernel); failures are rows with status 'error'."""
    from tqdm import tqdm

    from kernels.device import compile_only

    rows = []
    cases = [c for c in _torch_cases() if not families or c.family in families]
    work = [(c, t) for c in cases for t in targets]
    for case, target in tqdm(work, desc="compile", unit="case", disable=not progress):
        base = {"family": case.family, "case": case.label, "dtype": case.dtype,
                "main": case.main, "target": target}
        try:
            with compile_only(target) as compiled:
                case.run()
        except Exception as e:  # a compiler error is a result, reported in the table
            rows.append(base | {"kernel": "—", "status": f"error: {_first_line(e)}"})
            continue
        rows.extend(base | k.summary() | {"kernel": k.name, "status": _verdict(case, k)}
                    for k in compiled)
    return rows


def _verdict(case: Case, k) -> str:
    if not k.fits:
        return f"FAIL: shared memory {k.shared_bytes} B > {k.shared_limit} B"
    if k.spill_bytes and case.main and (k.name, k.target, case.dtype) not in ACCEPTED_SPILLS:
        return f"FAIL: spills {k.spill_bytes} B/thread in a main config"
    return "ok"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _pallas_cases() -> list[tuple[str, str, Callable, tuple]]:
    """(family, name, fn, ShapeDtypeStructs): the labs' shapes, ragged, fwd and gradients."""
    import jax
    import jax.numpy as jnp

    from kernels.attention import flash_attention_pallas
    from kernels.moe.grouped_matmul_pallas import grouped_matmul_pallas
    from kernels.paged import paged_attention_pallas, rope_pallas
    from kernels.softmax import softmax_pallas

    def grads(f):  # every input's cotangent, through the kernels' custom_vjp backward
        def pulled(*args):
            out, pull = jax.vjp(f, *args)
            return pull(out)
        return pulled

    S = jax.ShapeDtypeStruct
    sizes = jnp.array([37] * 8, jnp.int32)       # 37 rows per expert: tiles straddle experts
    cases = []
    for dt in (jnp.float32, jnp.bfloat16):
        tag = jnp.dtype(dt).name
        cases.append(("softmax", f"softmax_pallas 256×50000 {tag}", softmax_pallas,
                      (S((256, 50_000), dt),)))
        for d in (64, 128):
            qkv = (S((2, 8, 1000, d), dt), S((2, 2, 1000, d), dt), S((2, 2, 1000, d), dt))
            att = lambda q, k, v: flash_attention_pallas(q, k, v, causal=True)
            cases.append(("attention", f"flash_attention_pallas fwd d={d} GQA 8/2 causal {tag}",
                          att, qkv))
            cases.append(("attention", f"flash_attention_pallas grads d={d} GQA 8/2 causal "
                          f"{tag}", grads(att), qkv))
        gmm = lambda x, w: grouped_matmul_pallas(x, w, sizes)
        xw = (S((296, 2048), dt), S((8, 2048, 1408), dt))
        cases.append(("moe", f"grouped_matmul_pallas fwd E=8 2048→1408 {tag}", gmm, xw))
        cases.append(("moe", f"grouped_matmul_pallas grads E=8 2048→1408 {tag}", grads(gmm),
                      xw))
        for hq, hkv, d in ((32, 8, 128), (8, 8, 64), (8, 1, 80)):
            paged = (S((4, hq, d), dt), S((300, 16, hkv, d), dt), S((300, 16, hkv, d), dt),
                     S((4, 70), jnp.int32), S((4,), jnp.int32))
            cases.append(("paged", f"paged_attention_pallas 4 splits Hq/Hkv={hq}/{hkv} d={d} "
                          f"{tag}", lambda *a: paged_attention_pallas(*a, num_splits=4), paged))
        for interleaved in (False, True):
            rot = lambda x, p, il=interleaved: rope_pallas(x, p, interleaved=il)
            xp = (S((37, 32, 128), dt), S((37,), jnp.int32))
            cases.append(("paged", f"rope_pallas fwd interleaved={interleaved} {tag}", rot, xp))
            cases.append(("paged", f"rope_pallas grads interleaved={interleaved} {tag}",
                          lambda x, p, rot=rot: jax.vjp(lambda x_: rot(x_, p), x)[1](x), xp))
    for module in case_modules():
        if hasattr(module, "pallas_cases"):
            cases += module.pallas_cases()
    return cases


def lower_pallas(families=None, progress: bool = True) -> list[dict]:
    """Every public Pallas function (forward and gradients) lowered for TPU, f32 and bf16."""
    from kernels.tpu_lowering import lower_for_tpu

    rows = []
    for family, name, fn, args in _pallas_cases():
        if families and family not in families:
            continue
        rec = lower_for_tpu(fn, *args, name=name)
        status = rec["status"]
        if status == "ok" and not rec["tpu_custom_call"]:
            status = "no tpu_custom_call: the Mosaic lowering did not run"
        elif status == "ok" and not rec["fits_vmem"]:
            status = f"VMEM {rec['vmem_bytes']} B > {rec['vmem_budget']}"
        rows.append(rec | {"family": family, "case": name, "kernel": name,
                           "dtype": name.rsplit(" ", 1)[-1], "main": True,
                           "status": "ok" if status == "ok" else f"FAIL: {status[:300]}"})
        if progress:
            print(f"tpu  {name}: {rows[-1]['status']}", file=sys.stderr)
    return rows


BUILT_IN_FAMILIES = ("softmax", "attention", "sampling", "moe", "paged")
KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def case_modules() -> list:
    """The kernel packages that declare their own compile cases (module docstring)."""
    return [importlib.import_module(f"kernels.{p.parent.name}.compile_cases")
            for p in sorted(KERNELS.glob("*/compile_cases.py"))]


def families() -> tuple[str, ...]:
    return BUILT_IN_FAMILIES + tuple(m.FAMILY for m in case_modules())


def run(targets: tuple[str, ...], families=None, progress: bool = True) -> list[dict]:
    rows = []
    gpu = tuple(t for t in targets if t in GPU_TARGETS)
    if gpu:
        rows += compile_triton(gpu, families, progress)
    if "tpu" in targets:
        rows += lower_pallas(families, progress)
    return rows


def failures(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] != "ok"]


def parse_targets(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad or not targets:
        raise ValueError(f"--target must list some of {','.join(ALL_TARGETS)}, got {text!r}")
    return targets


def compile_env() -> dict:
    """The environment of a process that builds kernels for real hardware: no interpreter, FP
    fusion pinned (Triton 3.9 warns that its default will flip), JAX on the CPU unless told."""
    return dict(os.environ, KC_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
                JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))


def in_compile_mode(argv: list[str]) -> int | None:
    """Re-run `kclub compile` in a process with KC_INTERPRET=0 unless this one already is.

    Returns the child's exit code, or None when this process can compile itself."""
    import kernels.device

    if not kernels.device.INTERPRET:
        return None
    return subprocess.call([sys.executable, "-m", "shared.cli", *argv], env=compile_env())


_CENSUS_COLS = ("mma.sync", "wgmma", "ldmatrix", "cp.async", "cp.async.bulk", "ex2.approx",
                "lg2.approx", "ld.global.v4")


def table(rows: list[dict]) -> str:
    """Markdown: one line per compiled kernel (GPU) or lowered function (TPU)."""
    head = ["target", "case", "dtype", "kernel", "regs", "spill B", "smem KB / limit", "occ.",
            *_CENSUS_COLS, "VMEM KB", "status"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        census = r.get("census") or {}
        smem = (f"{r['shared_bytes'] / 1024:.0f} / {r['shared_limit'] / 1024:.0f}"
                if "shared_bytes" in r else "")
        cells = [r["target"], r["case"], r.get("dtype", ""), r["kernel"],
                 str(r.get("registers", "")), str(r.get("spill_bytes", "")), smem,
                 f"{r['occupancy']:.3g}" if "occupancy" in r else "",
                 *(str(census.get(c, "")) for c in _CENSUS_COLS),
                 f"{r['vmem_bytes'] / 1024:.0f}" if "vmem_bytes" in r else "", r["status"]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_families(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    chosen = tuple(f.strip() for f in text.split(",") if f.strip())
    known = families()
    bad = [f for f in chosen if f not in known]
    if bad or not chosen:
        raise ValueError(f"--family must list some of {','.join(known)}, got {text!r}")
    return chosen


def compiled(families: str, targets: str = "sm_80,sm_90,tpu") -> list[dict]:
    """For a lab (which runs in interpret mode): `kclub compile --json` for some kernel
    families, in a fresh KC_INTERPRET=0 process; the rows, or RuntimeError with its stderr."""
    import json

    run_ = subprocess.run([sys.executable, "-m", "shared.cli", "compile", "--json", "--target",
                           targets, "--family", families], env=compile_env(), capture_output=True,
                          text=True, timeout=1800)
    try:
        return json.loads(run_.stdout)["rows"]
    except (json.JSONDecodeError, KeyError):
        raise RuntimeError(f"kclub compile failed ({run_.returncode}):\n"
                           f"{run_.stderr[-3000:]}") from None


def main(targets_text: str, as_json: bool, families_text: str | None = None) -> int:
    import json

    targets = parse_targets(targets_text)
    rows = run(targets, parse_families(families_text), progress=not as_json)
    bad = failures(rows)
    if as_json:
        print(json.dumps({"targets": targets, "rows": rows, "failures": len(bad)}, indent=1,
                         default=str))
    else:
        print(table(rows))
        print(f"\n{len(rows) - len(bad)}/{len(rows)} ok on {', '.join(targets)}")
        for r in bad:
            print(f"FAIL {r['target']} {r['case']} [{r.get('dtype', '')}] {r['kernel']}: "
                  f"{r['status']}", file=sys.stderr)
    return 1 if bad else 0
