"""How the Triton softmax kernels tile their input: one heuristic from (n_rows, n_cols, dtype).

Both kernels (online and safe) take the same tiling, so their comparison stays about the
algorithm. Two regimes:

- **Short rows** (the row fits one tile, `n_cols <= block_n`): nothing differs between the
  algorithms; what matters is moving bytes. A tile is BLOCK_M whole rows (about 8 KB, so a row of
  128 fp16 values still gives a program 32 rows of work), num_warps is chosen so each thread
  holds 32 bytes of it (two 16-byte loads), and the grid is persistent: as many programs as
  fit on the GPU at once (SMs × programs per SM), each walking tiles pid, pid + P, ... with the
  next tiles' loads in flight (`tl.range(num_stages=3)`: Triton turns them into cp.async copies
  into shared memory, so tile i+1 streams in while tile i is reduced). The first GPU run (H200,
  docs/gpu-runs/2026-11-27-h200) had 4096 × 1024 fp16 at 181-273 GB/s with [8, 1024] tiles on
  4 warps, one tile per program and no prefetch, against torch.softmax's 1253.
- **Long rows** (swept in tiles of BLOCK_N = 1024): the path that measured online/safe = 1.35×
  on that H200 at 16k-64k columns, kept as it was: [8, 1024] tiles on 4 warps, one row block per
  program, no prefetch.
In both, when the rows are too few to give every SM a row block, blocks take fewer rows.

Rows of up to MAX_ONE_TILE columns are kept whole by default; longer rows are swept, so the
online/safe comparison the paper makes (4 vs 3 accesses per element) is there from 4097 columns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from kernels import device

MAX_ONE_TILE = 4096      # default: rows up to this long stay whole in registers (one tile)
LONG_BLOCK_N = 1024      # default tile width of the multi-tile sweeps (measured, see above)
LONG_TILE = 8192         # elements per multi-tile program: [8, 1024] on 4 warps, 64 per thread
SHORT_TILE_BYTES = 8192  # one-tile path: bytes per program per tile (8 KB = 4096 fp16 values)
BYTES_PER_THREAD = 32    # one-tile path: two 16-byte vector loads per thread per tile
SHORT_STAGES = 3         # one-tile path: tiles in flight per program (cp.async pipeline depth)
MAX_STAGED_TILE = 16384  # bytes: larger one-tile tiles are not staged (shared memory budget)
MAX_WARPS = 16
# The persistent grid launches only what fits on the GPU at once, so that no program waits for
# a second wave with all its tiles. What fits is decided by registers: this many per thread is
# assumed, and tests/test_online_softmax_measure.py compiles the one-tile configurations for
# sm_80 and sm_90 and checks that none needs more.
REGISTER_BUDGET = 64
REGISTERS_PER_SM, WARPS_PER_SM, PROGRAMS_PER_SM = 65536, 64, 32   # sm_80 and sm_90 alike
SMS_OFF_GPU = {"sm_80": 108, "sm_90": 132, None: 132}   # A100, H100; the interpreter: an H100


@dataclass(frozen=True)
class Tiling:
    """One launch: tiles of [block_m, block_n], `programs` programs walking them (each takes row
    blocks pid, pid + programs, ...), num_warps per program, num_stages tiles in flight."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    programs: int

    def check(self) -> Tiling:
        """ValueError naming the field that is not a valid launch."""
        for name in ("block_m", "block_n", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
                raise ValueError(f"tiling.{name} must be a power of two >= 1, got {v!r}")
        if self.num_warps > 32:
            raise ValueError(f"tiling.num_warps must be at most 32, got {self.num_warps}")
        for name in ("num_stages", "programs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"tiling.{name} must be an int >= 1, got {v!r}")
        return self


def check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(where: torch.device) -> int:
    """SMs of the GPU the launch goes to; off a GPU, those of the compile target (or an H100's)."""
    if where.type == "cuda":
        return _cuda_sms(where.index if where.index is not None else torch.cuda.current_device())
    return SMS_OFF_GPU.get(device.target(), SMS_OFF_GPU[None])


def programs_per_sm(num_warps: int) -> int:
    """Programs of `num_warps` warps the persistent grid puts on each SM: as many as the warp
    slots and REGISTER_BUDGET registers per thread allow (CUDA's block cap too)."""
    return min(WARPS_PER_SM // num_warps, PROGRAMS_PER_SM,
               REGISTERS_PER_SM // (REGISTER_BUDGET * 32 * num_warps))


def _pow2_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _fill_sms(block_m: int, n_rows: int, sms: int) -> int:
    """Fewer rows per block when there are too few rows to give every SM a block: parallelism
    first, then tile size (a decode step's 4 rows make 4 programs, not 1)."""
    if triton.cdiv(n_rows, block_m) >= sms:
        return block_m
    return max(1, min(block_m, _pow2_at_most(n_rows // sms)))


def choose(n_rows: int, n_cols: int, element_size: int, block_size: int | None,
           sms: int) -> Tiling:
    """The tiling for a [n_rows, n_cols] input of `element_size`-byte values on `sms` SMs;
    `block_size` (a power of two >= 16), when given, fixes the tile width."""
    if block_size is None:
        block_n = triton.next_power_of_2(max(n_cols, 16)) if n_cols <= MAX_ONE_TILE else \
            LONG_BLOCK_N
    else:
        check_block_size(block_size)
        block_n = block_size
    rows = triton.next_power_of_2(n_rows)
    if n_cols > block_n:   # long rows: the measured multi-tile path
        block_m = _fill_sms(max(1, min(rows, LONG_TILE // block_n)), n_rows, sms)
        return Tiling(block_m, block_n, 4, 1, triton.cdiv(n_rows, block_m))
    block_m = _fill_sms(max(1, min(rows, SHORT_TILE_BYTES // (block_n * element_size))),
                        n_rows, sms)
    tile_bytes = block_m * block_n * element_size
    num_warps = max(1, min(MAX_WARPS, _pow2_at_most(tile_bytes // (32 * BYTES_PER_THREAD))))
    n_blocks = triton.cdiv(n_rows, block_m)
    if tile_bytes > MAX_STAGED_TILE:   # a wide block_size asked for: no staging, no persistence
        return Tiling(block_m, block_n, num_warps, 1, n_blocks)
    return Tiling(block_m, block_n, num_warps, SHORT_STAGES,
                  min(n_blocks, sms * programs_per_sm(num_warps)))
