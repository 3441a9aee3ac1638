"""What the compiler made of the softmax kernels: the online-softmax lab's compiled-truth section.

Two reads, each in a fresh KC_INTERPRET=0 process (the lab runs in the interpreter, and a kernel
decorated there cannot be compiled; docs/cpu-notes.md, "Triton's interpreter"):
- `shared.compile_report.compiled("softmax")`: registers, spills, shared memory, occupancy and
  the instruction census per kernel, target and case, as `kclub compile` reports them;
- `memory_ops()`: the global loads and stores in each kernel's PTX with their width in bytes,
  which compile_report's rows do not carry (they drop the PTX). A 16-byte load (`ld.global.v4.b32`)
  moves eight fp16 values per instruction, a 2-byte one (`ld.global.b16`) one. The one-tile path
  prefetches its tiles with `cp.async` (global to shared memory, kernels/softmax/tiling.py):
  those copies are its loads, counted with their width too.
`persistent_fit` checks the one assumption the persistent grid makes of the compiler: that the
programs it launches per SM all fit there at once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from kernels.softmax.tiling import programs_per_sm
from shared import roofline
from shared.compile_report import compile_env

KERNELS = {"softmax_online_kernel": "online", "softmax_safe_kernel": "safe"}
# The (rows, cols, dtype) the PTX is read at: one tile (1000, a multiple of 8 but not of 16, so
# only ALIGN lets the loads be vectorised), an odd one that cannot be (1001), many tiles (50000,
# 8 rows per program); and the one-tile launches with the most programs per SM (short rows, 4
# warps) and the most warps (a 16 KB fp32 row, 16 warps), for persistent_fit.
PTX_CASES = ((256, 1000, "fp16"), (256, 1001, "fp16"), (2048, 50_000, "fp16"),
             (4096, 128, "fp16"), (64, 4096, "fp32"))
_MEM_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global(\S*)\s", re.M)
# cp.async.cg.shared.global [dst], [src], 0x10, ...: a global-to-shared copy of 16 bytes
_CP_ASYNC = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.c[ag]\.shared\.global\s+\[[^]]*\],"
                       r"\s*\[[^]]*\],\s*(0x[0-9a-fA-F]+|\d+)", re.M)


def _width(suffix: str) -> int:
    """Bytes one ld/st moves, from its PTX type suffix: `.v4.b32` -> 16, `.b16` -> 2."""
    vec = re.search(r"\.v(\d+)", suffix)
    bits = re.findall(r"\.[bfsu](\d+)", suffix)
    if not bits:
        raise ValueError(f"no type width in PTX suffix {suffix!r}")
    return (int(vec.group(1)) if vec else 1) * int(bits[-1]) // 8


def ptx_memory_ops(ptx: str) -> dict:
    """{"ld": {width: count}, "st": {...}} of the global loads and stores written in `ptx`;
    cp.async copies from global memory count as loads."""
    ops: dict = {"ld": {}, "st": {}}
    found = [(kind, _width(suffix)) for kind, suffix in _MEM_OP.findall(ptx)]
    found += [("ld", int(size, 0)) for size in _CP_ASYNC.findall(ptx)]
    for kind, w in found:
        ops[kind][w] = ops[kind].get(w, 0) + 1
    return ops


def _compile_memory_ops(cases=PTX_CASES) -> list[dict]:
    """Runs in the KC_INTERPRET=0 child: both kernels compiled for sm_80 and sm_90 at each case
    (torch.empty: compiled, never run)."""
    import torch

    from kernels.compile_only import compile_only
    from kernels.softmax import safe_softmax, softmax

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    out = []
    for target in ("sm_80", "sm_90"):
        for fn in (softmax, safe_softmax):
            for rows, n, dt in cases:
                with compile_only(target) as built:
                    fn(torch.empty(rows, n, dtype=dtypes[dt]))
                out += [{"target": target, "rows": rows, "cols": n, "dtype": dt,
                         "kernel": k.name, "constexprs": k.constexprs,
                         "num_warps": k.num_warps, "registers": k.registers,
                         "occupancy": k.occupancy, **ptx_memory_ops(k.ptx)} for k in built]
    return out


def memory_ops(cases=PTX_CASES) -> list[dict]:
    """`_compile_memory_ops` in a fresh KC_INTERPRET=0 process (the lab's own process
    interprets); widths come back as JSON strings and are turned into ints here."""
    code = ("import json; from shared.benchmarks.online_softmax_compiled import "
            f"_compile_memory_ops as f; print(json.dumps(f({tuple(cases)!r})))")
    run = subprocess.run([sys.executable, "-c", code], env=compile_env(), capture_output=True,
                         text=True, timeout=900)
    if run.returncode:
        raise RuntimeError(f"compiling the softmax kernels failed:\n{run.stderr[-3000:]}")
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    for r in rows:
        r["ld"] = {int(w): c for w, c in r["ld"].items()}
        r["st"] = {int(w): c for w, c in r["st"].items()}
    return rows


def gpu_rows(rows: list[dict]) -> list[dict]:
    """The Triton rows of `compiled("softmax")` (not the TPU ones), failures included."""
    return [r for r in rows if r["target"] in ("sm_80", "sm_90")]


def table(rows: list[dict], dtype: str = "fp16") -> str:
    """One line per compiled kernel of `dtype`: resources, tiles and the instruction mix."""
    head = (f"{'target':6} {'case':24} {'kernel':6} {'regs':>4} {'spill':>5}"
            f" {'smem B/limit KB':>15} {'occ.':>5} {'BLOCK_M×N':>9} {'warps':>5} {'ex2':>4}"
            f" {'mma+wgmma':>9} {'cp.async':>8}")
    lines = [head, "-" * len(head)]
    for r in gpu_rows(rows):
        if r["dtype"] != dtype:
            continue
        c, k = r["census"], r["constexprs"]
        lines.append(
            f"{r['target']:6} {r['case']:24} {KERNELS[r['kernel']]:6} {r['registers']:4d}"
            f" {r['spill_bytes']:5d} {r['shared_bytes']:>6d}/{r['shared_limit'] // 1024:<8d}"
            f" {r['occupancy']:5.3f} {k['BLOCK_M']:>3}×{k['BLOCK_N']:<5} {r['num_warps']:5d}"
            f" {c['ex2.approx']:4d} {c['mma.sync'] + c['wgmma']:9d}"
            f" {c['cp.async'] + c['cp.async.bulk']:8d}")
    return "\n".join(lines)


def occupancy_inputs(rows: list[dict], target: str, case: str, dtype: str = "fp16") -> dict:
    """Per kernel, what `roofline.occupancy_bandwidth` needs, from the compiled rows of the
    case of shape `case` ("2048×50000"): the occupancy, and the bytes one warp keeps in flight —
    its share of one tile (BLOCK_M × BLOCK_N elements over num_warps warps), times the tiles in
    flight (NUM_STAGES) where cp.async prefetches them (the one-tile path; the swept rows load
    one tile per sweep straight into registers)."""
    size = {"fp16": 2, "bf16": 2, "fp32": 4}[dtype]
    out = {}
    for r in gpu_rows(rows):
        if r["target"] != target or r["dtype"] != dtype or not r["case"].endswith(f" {case}"):
            continue
        k = r["constexprs"]
        stages = k.get("NUM_STAGES", r["num_stages"]) if r["census"]["cp.async"] else 1
        out[r["kernel"]] = {"occupancy": r["occupancy"], "registers": r["registers"],
                            "bytes_in_flight_per_warp":
                                k["BLOCK_M"] * k["BLOCK_N"] * size * stages / r["num_warps"]}
    if set(out) != set(KERNELS):
        raise ValueError(f"no {dtype} rows for both kernels at {case} on {target}")
    return out


def persistent_fit(rows: list[dict]) -> list[dict]:
    """For every compiled one-tile kernel (the persistent launches), the programs per SM its
    compiled occupancy lets reside at once against the programs per SM the grid launches
    (kernels.softmax.tiling.programs_per_sm). A ratio under 1 would leave programs, each with a
    share of the tiles, waiting for a second wave."""
    out = []
    for r in rows:
        if r.get("target") not in ("sm_80", "sm_90") or not r["constexprs"].get("ONE_TILE"):
            continue
        resident = round(r["occupancy"] * 64) // r["num_warps"]   # 64 warp slots per SM
        launched = programs_per_sm(r["num_warps"])
        out.append({"target": r["target"], "kernel": r["kernel"], "dtype": r["dtype"],
                    "num_warps": r["num_warps"], "registers": r["registers"],
                    "resident": resident, "launched": launched, "ratio": resident / launched})
    return out


def occupancy_needed(hw: str, bytes_in_flight_per_warp: float) -> float:
    """The occupancy below which Little's law, not the datasheet, caps the HBM bandwidth:
    warps × bytes each / latency = bandwidth."""
    part = roofline.hardware(hw)
    return part.mem_bw * part.mem_latency_s / (part.max_warps_per_sm * part.sms
                                               * bytes_in_flight_per_warp)
