"""Compile Triton kernels for a real GPU from a machine without one, through the real launcher.

Triton's interpreter accepts any block shape and has no register or shared-memory limit, so a
kernel that passes its tests on a CPU can still spill, overflow shared memory or miss the tensor
cores on the hardware. Inside `compile_only("sm_90")` every `kernel[grid](...)` call is compiled
for that target, with the block sizes, num_warps and num_stages its launcher chose, and not
launched; each compiled kernel is recorded with what ptxas made of it:

    with compile_only("sm_90") as compiled:
        flash_attention(q, k, v)            # CPU tensors: compiled, never run
    compiled[0].registers, compiled[0].spill_bytes, compiled[0].census["wgmma"]

How: Triton's JITFunction.run(..., warmup=True) compiles and returns without launching, against
`triton.runtime.driver.active.get_current_target()`. We install a driver that names the target
(and a device key of its own, so sm_80 and sm_90 builds never share a cache entry) and route
every run through warmup. Outputs stay unwritten, so host code after a launch sees garbage: call
public kernels, not whole models. Needs the interpreter off (KC_INTERPRET=0 before `import
kernels`): a kernel decorated under the interpreter cannot be compiled
(docs/cpu-notes.md, "Triton's interpreter").
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kernels import device
from kernels.device import INTERPRET


@dataclass(frozen=True)
class GpuTarget:
    """What the occupancy and shared-memory checks need of one GPU generation."""

    name: str              # "sm_80"
    gpu: str               # the part we quote limits for
    capability: int        # 80
    smem_per_block: int    # bytes, the opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    smem_per_sm: int       # bytes
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


# CUDA C Programming Guide, "Technical Specifications per Compute Capability" (8.0 and 9.0).
TARGETS = {
    "sm_80": GpuTarget("sm_80", "A100", 80, smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
    "sm_90": GpuTarget("sm_90", "H100", 90, smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
}

# Instructions worth counting in the PTX: tensor-core MMAs (Ampere mma.sync, Hopper wgmma),
# shared->register matrix loads, asynchronous global->shared copies (cp.async: Ampere's
# software pipelining; cp.async.bulk: Hopper's TMA), the fast exp2/log2 the softmax and sampling
# kernels use, and 16-byte vector loads (how wide the global loads came out).
CENSUS = {
    "mma.sync": r"^\s*mma\.sync\b",
    "wgmma": r"^\s*wgmma\.mma_async\b",
    "ldmatrix": r"^\s*ldmatrix\b",
    "cp.async": r"^\s*cp\.async\.(ca|cg)\b",
    "cp.async.bulk": r"^\s*cp\.async\.bulk\b",
    "ex2.approx": r"^\s*ex2\.approx\b",
    "lg2.approx": r"^\s*lg2\.approx\b",             # the sampling kernels' logs
    "ld.global.v4": r"^\s*(@%p\d+\s+)?ld\.global(\.\w+)*\.v4\b",  # 16-byte vector loads
}


@dataclass
class CompiledKernel:
    """One kernel compiled for one target: its resources and its instruction mix."""

    name: str
    target: str
    registers: int
    spill_bytes: int           # per thread: the stack frame ptxas spilled to (cubin_usage)
    shared_bytes: int
    num_warps: int
    num_stages: int
    constexprs: dict
    census: dict
    ptx: str = field(repr=False)

    @property
    def shared_limit(self) -> int:
        return TARGETS[self.target].smem_per_block

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit

    @property
    def occupancy(self) -> float:
        return occupancy(TARGETS[self.target], self.registers, self.num_warps, self.shared_bytes)

    def summary(self) -> dict:
        """Everything but the PTX, for tables and JSON."""
        return {"name": self.name, "target": self.target, "registers": self.registers,
                "spill_bytes": self.spill_bytes, "shared_bytes": self.shared_bytes,
                "shared_limit": self.shared_limit, "num_warps": self.num_warps,
                "num_stages": self.num_stages, "occupancy": round(self.occupancy, 4),
                "constexprs": self.constexprs, "census": self.census}


def occupancy(t: GpuTarget, registers: int, num_warps: int, shared_bytes: int) -> float:
    """Theoretical occupancy: resident warps / the SM's maximum, limited by registers (allocated
    per warp in units of 256), shared memory (plus 1 KB the driver reserves per block) and the
    block and warp caps. The CUDA occupancy calculator's rules for sm_80/sm_90."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks_by_regs = (t.regs_per_sm // regs_per_warp) // num_warps
    blocks_by_smem = t.smem_per_sm // (shared_bytes + 1024)
    blocks_by_warps = t.max_warps_per_sm // num_warps
    blocks = min(blocks_by_regs, blocks_by_smem, blocks_by_warps, t.max_blocks_per_sm)
    return blocks * num_warps / t.max_warps_per_sm


def census(ptx: str) -> dict:
    lines = ptx.splitlines()
    return {name: sum(1 for line in lines if re.match(rx, line)) for name, rx in CENSUS.items()}


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+)")


def cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes per thread) of the cubin Triton built, read by
    the cuobjdump that ships with Triton.

    The stack frame is where ptxas spills: Triton kernels have no local arrays and no calls, so
    a non-zero frame is spill space (ptxas -v on the same PTX reports spill stores within a few
    bytes of it; Triton's own ptxas flags differ from a bare re-run, so the cubin is the truth).
    """
    from triton.backends.nvidia.compiler import get_ptxas

    tool = Path(get_ptxas(80).path).with_name("cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        run = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True,
                             text=True, timeout=120)
    usage = _RES_USAGE.search(run.stdout)
    if run.returncode or usage is None:
        raise RuntimeError(f"cuobjdump -res-usage failed:\n{run.stdout}{run.stderr}")
    return int(usage.group(1)), int(usage.group(2))


class _CompileOnlyDriver:
    """The part of a Triton driver that JITFunction.run reads before it would launch."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return f"compile-only:{self.target.arch}"  # a cache key of its own per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):
        raise AttributeError(f"compile_only: the driver has no {name!r} (nothing is launched)")


def record(fn, target: str, kernel) -> CompiledKernel:
    """Read a Triton CompiledKernel of JITFunction `fn`: metadata, PTX census, registers and
    spills of its cubin, and the constexprs the launcher chose, by parameter name."""
    ptx = kernel.asm["ptx"]
    regs, stack = cubin_usage(kernel.asm["cubin"])
    md = kernel.metadata
    constexprs = {}
    for key, value in getattr(kernel.src, "constants", {}).items():
        index = key[0] if isinstance(key, tuple) else key   # a path into the arguments
        name = fn.arg_names[index] if isinstance(index, int) else str(index)
        constexprs[name] = value
    return CompiledKernel(fn.__name__, target, regs, stack, md.shared, md.num_warps,
                          md.num_stages, constexprs, census(ptx), ptx)


@contextlib.contextmanager
def compile_only(target: str):
    """Inside the block, Triton launches compile for `target` ("sm_80" or "sm_90") instead of
    running; yields the list that collects one CompiledKernel per distinct compilation."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    if INTERPRET:
        raise RuntimeError("compile_only needs real Triton kernels: set KC_INTERPRET=0 before "
                           "`import kernels` (in a separate process; `kclub compile` does this)")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    compiled: list[CompiledKernel] = []
    seen: set[int] = set()
    original_run = JITFunction.run

    def run_compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None and id(kernel) not in seen:
            seen.add(id(kernel))
            compiled.append(record(self, target, kernel))
        return kernel

    saved = driver._active, device._compile_target
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", TARGETS[target].capability, 32)))
    JITFunction.run = run_compile_only
    device._compile_target = target  # the launchers choose their configs for this target
    try:
        yield compiled
    finally:
        JITFunction.run = original_run
        driver._active, device._compile_target = saved
