"""Launch configs for the Triton attention kernels, per GPU generation: the one place they are
chosen (`kclub compile` reports what was chosen, it does not choose).

How they were picked, without a GPU: `compile_only` sweeps over (block_m, block_n, num_warps,
num_stages) at head_dim 64 and 128 in fp16, reading ptxas's registers and spills and Triton's
shared memory (docs/compile.md). Rule: no spills, shared memory within the part's limit, then
the largest tiles (fewer re-reads of the streamed operand, FA2 §3.3) at the best occupancy.
Three kernels, three configs: the forward and the dQ kernel own a query block and stream keys,
the dK/dV kernel owns a key block and streams queries, so "large" is block_m for the first two
and block_n for the third (as in FA2 and Triton's fused-attention tutorial). These are
compile-time facts; which no-spill config is *fastest* needs a GPU (`make gpu-check`).

Size classes: a tile's registers and shared memory grow with head_dim × bytes per element, so
fp32 at head_dim 64 takes the 16-bit head_dim-128 row ("width" below is head_dim in 16-bit
units). Under the interpreter (no GPU) every kernel uses 64 × 64: speed does not matter there
and the labs' counted traffic is quoted at that tile.
"""

from __future__ import annotations

from kernels.attention._args import BlockSizes, padded_head_dim
from kernels.device import capability

# (width ≤ 64, width ≤ 128, width ≤ 256) -> config, per generation and kernel. Registers per
# thread from the sweep (fp16, causal, sm_80 / sm_90), every main pick without spills:
# - forward: the query block owns an fp32 (block_m × d) accumulator; 128 × 64 with 8 warps is
#   the largest no-spill tile on both parts at d = 64 (182 / 128 regs; on sm_90 two programs fit
#   per SM, so one's softmax can overlap the other's MMAs); at d = 128, 128 × 128 spills on
#   sm_90 and 128 × 64 on sm_80 (185 regs at sm_90's 128 × 64, 172 at sm_80's 64 × 64).
# - dK/dV: the key block owns dK and dV (two fp32 block_n × d tiles) and steps over queries;
#   block_n 128 (FA2's key tile) with 8 warps: 32- or 64-row query steps (sm_90 d = 64: 64 × 128,
#   208 regs; d = 128: 32 × 128, 246; 64 × 128 spills). sm_80 at d = 128 only fits block_n 64.
#   Its dots are (block_n × ·), so on sm_90 block_n >= 64 keeps every one on wgmma.
# - dQ: the query block owns dQ and steps over keys: 128 × 64 on sm_90 (147 / 232 regs);
#   sm_80: 128 × 64 at d = 64 (196), 64 × 64 at d = 128 (186; 128 × 32 spills).
# Stages: 3 where shared memory allows it, 2 where a third stage buys nothing but spills or
# passes the part's limit. Which no-spill config is fastest is the GPU's to say.
_AMPERE = {  # sm_80 (A100); also the rule for sm_86/sm_89
    "forward": (BlockSizes(128, 64, 8, 3), BlockSizes(64, 64, 8, 3), BlockSizes(64, 32, 8, 2)),
    "dkdv": (BlockSizes(32, 128, 8, 3), BlockSizes(32, 64, 8, 3), BlockSizes(32, 32, 8, 3)),
    "dq": (BlockSizes(128, 64, 8, 3), BlockSizes(64, 64, 8, 3), BlockSizes(32, 32, 8, 3)),
}
_HOPPER = {  # sm_90 (H100, H200): wgmma wants 64-row warpgroup tiles; 227 KB of shared memory
    "forward": (BlockSizes(128, 64, 8, 3), BlockSizes(128, 64, 8, 3), BlockSizes(64, 32, 8, 2)),
    "dkdv": (BlockSizes(64, 128, 8, 3), BlockSizes(32, 128, 8, 2), BlockSizes(32, 64, 8, 2)),
    "dq": (BlockSizes(128, 64, 8, 3), BlockSizes(128, 64, 8, 2), BlockSizes(64, 32, 8, 2)),
}
INTERPRETER = BlockSizes(64, 64)


def _width(head_dim: int, element_size: int) -> int:
    return padded_head_dim(head_dim) * element_size // 2


def default_blocks(pass_: str, head_dim: int, element_size: int) -> BlockSizes:
    """The tiles, warps and stages for `pass_` ("forward", "dkdv" or "dq") on the current target
    (kernels.device.target(): the GPU, or the target of an enclosing compile_only)."""
    return for_capability(capability(), pass_, head_dim, element_size)


def for_capability(cap: int, pass_: str, head_dim: int, element_size: int) -> BlockSizes:
    """default_blocks on compute capability `cap` (80, 90, ...; 0: the interpreter), wherever
    this runs: what the benchmark's predictions for a GPU are made with."""
    if pass_ not in _HOPPER:
        raise ValueError(f"pass_ must be one of {sorted(_HOPPER)}, got {pass_!r}")
    if cap == 0:
        return INTERPRETER
    table = _HOPPER if cap >= 90 else _AMPERE
    width = _width(head_dim, element_size)
    row = 0 if width <= 64 else 1 if width <= 128 else 2
    return table[pass_][row]
