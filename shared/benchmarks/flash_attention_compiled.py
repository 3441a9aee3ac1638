"""What the compiler made of the FlashAttention kernels, and what it changes in the GPU model.

Reads the rows of `shared.compile_report.compiled("attention")` (`kclub compile`: ptxas
registers and spills, shared memory against the part's limit, an instruction census,
theoretical occupancy, and the tiles each target's launcher chose) and turns them into the
lab's table and into the two places where occupancy enters a prediction:

- memory: Little's law (`roofline.occupancy_bandwidth`): can the resident warps keep enough
  K/V bytes in flight to reach the datasheet bandwidth?
- compute: the forward pass does one exp per score next to 4·d matmul FLOPs, and the exps run
  on the special-function unit (MUFU, `ex2.approx` in the census), 16 per clock per SM on
  sm_80 and sm_90. A roofline assumes the exps hide under the MMAs; hiding them needs another
  warp ready to issue MMAs on the same scheduler, which is what occupancy counts.
"""

from __future__ import annotations

from dataclasses import replace

from kernels.attention import BlockSizes
from shared import roofline

# Part -> compile target of kernels.compile_only (the launchers' per-target configs).
TARGET = {"A100 80GB": "sm_80", "H100 SXM": "sm_90"}
KERNELS = {"flash_fwd_kernel": "forward", "flash_bwd_dkdv_kernel": "bwd dK/dV",
           "flash_bwd_dq_kernel": "bwd dQ", "flash_bwd_preprocess_kernel": "bwd D pre-pass"}
SCHEDULERS_PER_SM = 4          # warp schedulers (SM sub-partitions) on sm_80 and sm_90
MUFU_PER_CLOCK_PER_SM = 16     # ex2 results per clock per SM (CUDA guide, throughput table)
# The clocks at which the datasheet fp16 peaks hold (A100: 108 SMs x 2048 FLOP/clk x 1.41 GHz
# = 312 T; H100 SXM and H200, the same SM and peak: 132 x 4096 x 1.83 GHz = 989 T), so the exp
# rate is on the same footing.
CLOCK_HZ = {"A100 80GB": 1.41e9, "H100 SXM": 1.83e9, "H200": 1.83e9}


def select(rows: list[dict], *, target: str | None = None, dtype: str | None = None,
           case: str | None = None, kernel: str | None = None) -> list[dict]:
    """This lab's flash-kernel rows, filtered; `case` matches a substring of the case label."""
    return [r for r in rows if r.get("kernel") in KERNELS
            and (target is None or r["target"] == target)
            and (dtype is None or r["dtype"] == dtype)
            and (case is None or case in r["case"])
            and (kernel is None or r["kernel"] == kernel)]


def one(rows: list[dict], **where) -> dict:
    found = select(rows, **where)
    if len(found) != 1:
        raise ValueError(f"expected one compiled row for {where}, found {len(found)}")
    return found[0]


def blocks(row: dict) -> BlockSizes:
    """The tiles (and warps, stages) the launcher chose for this kernel on this target."""
    c = row["constexprs"]
    return BlockSizes(c["BLOCK_M"], c["BLOCK_N"], row["num_warps"], row["num_stages"])


def table(rows: list[dict]) -> str:
    """One line per (case, kernel, target): what a reader compares between sm_80 and sm_90."""
    head = (f"{'kernel':14s} {'d':>3} {'target':6s} {'tiles':>7} {'warps':>5} {'stages':>6} "
            f"{'regs':>4} {'spill':>5} {'smem KB/limit':>13} {'occ.':>5} {'mma.sync':>8} "
            f"{'wgmma':>5} {'cp.async':>8} {'ex2':>4}")
    lines = [head]
    for r in rows:
        c, census = r["constexprs"], r["census"]
        tiles = f"{c['BLOCK_M']}x{c['BLOCK_N']}" if "BLOCK_N" in c else f"{c['BLOCK_M']}"
        smem = f"{r['shared_bytes'] / 1024:.0f}/{r['shared_limit'] / 1024:.0f}"
        lines.append(
            f"{KERNELS[r['kernel']]:14s} {c['BLOCK_D']:3d} {r['target']:6s} {tiles:>7} "
            f"{r['num_warps']:5d} {r['num_stages']:6d} {r['registers']:4d} {r['spill_bytes']:5d} "
            f"{smem:>13} {r['occupancy']:5.3f} {census['mma.sync']:8d} {census['wgmma']:5d} "
            f"{census['cp.async']:8d} {census['ex2.approx']:4d}")
    return "\n".join(lines)


def warps_per_scheduler(row: dict, hw: str) -> float:
    """Resident warps each scheduler can switch between (theoretical occupancy)."""
    return row["occupancy"] * roofline.hardware(hw).max_warps_per_sm / SCHEDULERS_PER_SM


def forward_bytes_in_flight(row: dict, itemsize: int = 2) -> float:
    """Bytes one warp of the compiled forward keeps in flight: each program keeps num_stages K
    and V tiles loading when cp.async pipelines the loads (one pair otherwise), shared by its
    warps."""
    if row["kernel"] != "flash_fwd_kernel":
        raise ValueError(f"row must be a flash_fwd_kernel row, got {row['kernel']!r}")
    c = row["constexprs"]
    stages = row["num_stages"] if row["census"]["cp.async"] else 1
    return stages * 2 * c["BLOCK_N"] * c["BLOCK_D"] * itemsize / row["num_warps"]


def forward_bandwidth(row: dict, hw: str, itemsize: int = 2, cap: bool = True) -> float:
    """HBM bandwidth the compiled forward can sustain by Little's law (resident warps × bytes
    each keeps in flight / latency), capped by the datasheet unless `cap=False`."""
    per_warp = forward_bytes_in_flight(row, itemsize)
    if cap:
        return roofline.occupancy_bandwidth(hw, row["occupancy"], per_warp)
    part = roofline.hardware(hw)
    warps = row["occupancy"] * part.max_warps_per_sm * part.sms
    return warps * per_warp / part.mem_latency_s


def with_bandwidth(hw: str, bandwidth: float) -> roofline.Hardware:
    """The part with its memory roof lowered to `bandwidth` (never raised above the sheet)."""
    part = roofline.hardware(hw)
    return replace(part, mem_bw=min(part.mem_bw, bandwidth))


def exp_bound(hw: str, d: int) -> dict[str, float]:
    """Forward fraction of the fp16 matmul peak when each score costs 4·d matmul FLOPs and one
    exp on the MUFU: 'overlapped' if the exps hide under the MMAs (what a roofline assumes),
    'serial' if they do not (time = matmul + exp)."""
    part = roofline.hardware(hw)
    t_mma = 4 * d / part.peak("fp16")
    t_exp = 1 / (MUFU_PER_CLOCK_PER_SM * part.sms * CLOCK_HZ[hw])
    return {"overlapped": t_mma / max(t_mma, t_exp), "serial": t_mma / (t_mma + t_exp),
            "exp / mma time": t_exp / t_mma}
