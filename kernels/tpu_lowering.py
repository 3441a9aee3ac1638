"""Pallas on the real hardware: compiler params per backend, and TPU lowering checked from a CPU.

Interpret mode accepts any kernel; the compilers do not (docs/cpu-notes.md, "Pallas interpret
mode"; docs/compile.md). Two facts shape this file:
- One `pallas_call` takes one backend's compiler params. On a GPU, jax >= 0.10 sends a call with
  none to Mosaic GPU (Hopper only), while our kernels are written for the Triton lowering, so the
  Triton params are passed explicitly there; on a TPU the Mosaic params say which grid axes may
  run in parallel ("parallel") and which carry state from step to step ("arbitrary").
- `jax.export(..., platforms=["tpu"])` runs the Pallas TPU (Mosaic) lowering on a CPU machine,
  block-shape rules included; `lower_for_tpu` wraps it and adds the VMEM each kernel allocates
  (its pipelined blocks and its scratch: vmem_blocks).
  Mosaic's own layout passes run later, inside the TPU compiler: lowering is necessary, not
  sufficient, for a kernel to compile on a TPU.
"""

from __future__ import annotations

import math
import os

import jax
import jax.extend.core as jex
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels.device import pallas_interpret

TARGETS = ("tpu", "gpu")
# TPU v5e: 128 MiB of VMEM, of which XLA lets one kernel use a scoped 16 MiB by default
# (--xla_tpu_scoped_vmem_limit_kib; v6e's default is 32 MiB). The smallest default is the budget.
VMEM_BUDGET_BYTES = 16 * 2**20
VMEM_BUDGET_NAME = "TPU v5e scoped VMEM default (16 MiB)"


def pallas_target() -> str:
    """The hardware the Pallas kernels lay themselves out for: "tpu" or "gpu".

    A GPU backend means "gpu"; anything else "tpu" (on a CPU, interpret mode then checks the TPU
    layout, and the only real lowering reachable from a CPU without jaxlib's CUDA plugin is the TPU
    one). KC_PALLAS_TARGET=gpu|tpu overrides it, so tests run the GPU variants in interpret mode.
    """
    chosen = os.environ.get("KC_PALLAS_TARGET", "").strip().lower()
    if chosen:
        if chosen not in TARGETS:
            raise ValueError(f"KC_PALLAS_TARGET must be one of {TARGETS}, got {chosen!r}")
        return chosen
    return "gpu" if jax.default_backend() == "gpu" else "tpu"


def pad_to_multiple(a, axis: int, multiple: int):
    """`a` zero-padded at the end of `axis` to a multiple of `multiple` (whole blocks for a
    Pallas grid; the kernels mask or slice the padding off)."""
    import jax.numpy as jnp

    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def require_tpu(kernel: str, instead: str) -> None:
    """Refuse a TPU-only kernel on a GPU target: it needs scalar prefetch and ordered grid axes,
    which Pallas's Triton lowering has not. One message for every such kernel."""
    if pallas_target() != "tpu":
        raise RuntimeError(f"{kernel} is a TPU kernel: Pallas's Triton (GPU) lowering has no "
                           f"scalar prefetch and runs every grid axis in parallel; on a GPU use "
                           f"{instead}")


def compiler_params(target: str, semantics: tuple[str, ...], *, num_warps: int = 4,
                    num_stages: int = 2):
    """The compiler params of one pallas_call for `target`.

    semantics: per grid axis, "parallel" or "arbitrary" (Mosaic TPU: an "arbitrary" axis runs in
    order on one core, so an output block may accumulate across it). The Triton lowering runs
    every grid axis in parallel and has no such switch: a kernel that accumulates across steps
    must loop inside its body on a GPU. num_warps, num_stages: the Triton launch (GPU only).
    """
    if target == "tpu":
        return pltpu.CompilerParams(dimension_semantics=semantics)
    if target == "gpu":
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def check_gpu_blocks(target: str, **blocks: int) -> None:
    """The Triton lowering loads and stores only power-of-two-sized arrays: check block dims."""
    if target != "gpu":
        return
    for name, size in blocks.items():
        if size < 1 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two for the GPU (Triton) lowering")


def _subjaxprs(value):
    if isinstance(value, jex.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _subjaxprs(item)


# pallas_call: a kernel over a grid. mpmd_map: pl.kernel's launch on a mesh of cores (jax 0.10),
# whose body takes every operand and scratch buffer as a ref, with no grid.
_KERNEL_PRIMITIVES = ("pallas_call", "mpmd_map")


def _kernel_calls(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _KERNEL_PRIMITIVES:
            yield eqn
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                yield from _kernel_calls(sub)


def vmem_blocks(fn, *args) -> list[dict]:
    """Per Pallas kernel in `fn(*args)` (pallas_call or pl.kernel): its grid and the VMEM Mosaic
    allocates for it.

    Counted the way the Pallas TPU lowering describes each operand to Mosaic
    (jax/_src/pallas/mosaic/lowering.py, the `window_params` it emits):
    - With no grid there is no pipeline: every VMEM operand is one whole-array buffer.
    - With a grid, a VMEM block is double-buffered (the one in use and the next one being
      copied in) unless its spec asks for `pl.Buffered(1)`, or its window is trivial (the whole
      array at index 0, never re-fetched), for which the lowering forces one buffer.
    - Operands in ANY/HBM stay in HBM (the kernel DMAs from them itself), SMEM operands and
      scalar prefetch live in SMEM, semaphores in their own space: none of them is VMEM.
    - Scratch in VMEM (pallas_call's scratch_shapes, pl.kernel's scratch_types) is allocated
      once, for the whole kernel.
    block_bytes is one buffer of each VMEM block (a squeezed dim counts 1); vmem_bytes =
    Σ block bytes × buffers + scratch_bytes. Not counted: Mosaic's internal scratch, padding of
    a block to (8, 128) tiles, and buffers a body allocates itself with run_scoped.
    """
    calls = []
    for eqn in _kernel_calls(jax.make_jaxpr(fn)(*args).jaxpr):
        if eqn.primitive.name == "pallas_call":
            grid, blocks, scratch = _pallas_call_vmem(eqn)
        else:
            grid, blocks, scratch = (), *_core_map_vmem(eqn)
        calls.append({"kernel": eqn.params.get("name") or eqn.primitive.name, "grid": grid,
                      "block_bytes": sum(b for b, _ in blocks), "scratch_bytes": scratch,
                      "vmem_bytes": sum(b * n for b, n in blocks) + scratch})
    return calls


# The jax._src imports below are private, so made inside the functions: the kernels import this
# module for their compiler params and must not break on a JAX that moved them (the GPU
# machine's is newer).

def _in_vmem(memory_space) -> bool:
    """Where a TensorCore kernel keeps a ref of this memory space (None/default: VMEM)."""
    from jax._src.pallas.mosaic import core as tpu_core

    space = tpu_core.memory_space_to_tpu_memory_space(memory_space, tpu_core.CoreType.TC)
    return space == tpu_core.MemorySpace.VMEM


def _nbytes(aval) -> int:
    return math.prod(aval.shape) * aval.dtype.itemsize


def _pallas_call_vmem(eqn):
    """(grid, [(block bytes, buffers)], scratch bytes) of one pallas_call (vmem_blocks)."""
    from jax._src.pallas.core import MemorySpace, get_block_size

    mapping = eqn.params["grid_mapping"]
    grid = tuple(mapping.grid)
    blocks = [(math.prod(get_block_size(d) for d in bm.block_shape)
               * bm.array_aval.dtype.itemsize, _buffers(bm, grid))
              for bm in mapping.block_mappings
              if _in_vmem(bm.block_aval.memory_space or MemorySpace.DEFAULT)]
    scratch = sum(_nbytes(a) for a in mapping.scratch_avals if _in_vmem(a.memory_space))
    return grid, blocks, scratch


def _core_map_vmem(eqn):
    """([(operand bytes, 1)], scratch bytes) of one pl.kernel launch: its body's refs are the
    operands (inputs, then outputs) and then the scratch; each VMEM one is one buffer. One body
    per mesh (core type), each with its own VMEM: the largest is the budget's concern."""
    operands = len(eqn.invars) + len(eqn.params["out_avals"])
    best = ([], 0)
    for body in eqn.params["jaxprs"]:
        refs = [v.aval for v in getattr(body, "jaxpr", body).invars]
        blocks = [(_nbytes(a), 1) for a in refs[:operands] if _in_vmem(a.memory_space)]
        scratch = sum(_nbytes(a) for a in refs[operands:] if _in_vmem(a.memory_space))
        if sum(b for b, _ in blocks) + scratch > sum(b for b, _ in best[0]) + best[1]:
            best = (blocks, scratch)
    return best


def _buffers(block_mapping, grid: tuple) -> int:
    """VMEM buffers the lowering asks Mosaic for, for one block (vmem_blocks)."""
    if not grid or block_mapping.has_trivial_window():
        return 1
    mode = block_mapping.pipeline_mode
    return 2 if mode is None or mode.buffer_count is None else mode.buffer_count


def lower_for_tpu(fn, *args, name: str) -> dict:
    """Lower `fn(*args)` (args: jax.ShapeDtypeStruct) for TPU with jax.export; return a record.

    The record: name, target "tpu", status ("ok" or the error text), tpu_custom_call (whether a
    Mosaic kernel is in the module: a pallas_call built for interpret mode lowers to plain HLO
    instead), pallas_calls (vmem_blocks: every Pallas kernel), vmem_bytes (the largest call: calls
    run one at a time),
    the VMEM budget and whether it fits. Needs KC_INTERPRET=0 in the environment.
    """
    if pallas_interpret():
        raise RuntimeError(
            "lower_for_tpu needs the kernels built for real hardware, but pallas_interpret() is "
            "True: set KC_INTERPRET=0 in the environment of a fresh process (interpret-mode "
            "pallas_calls lower to plain HLO, so nothing of the TPU lowering would be checked)")
    if pallas_target() != "tpu":
        raise RuntimeError(f"lower_for_tpu needs pallas_target() == 'tpu', got "
                           f"{pallas_target()!r}: unset KC_PALLAS_TARGET")
    record = {"name": name, "target": "tpu", "status": "ok", "tpu_custom_call": False,
              "pallas_calls": [], "vmem_bytes": 0, "vmem_budget_bytes": VMEM_BUDGET_BYTES,
              "vmem_budget": VMEM_BUDGET_NAME, "fits_vmem": True}
    try:
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    except Exception as err:  # the record carries the lowering's own message
        record["status"] = f"{type(err).__name__}: {err}"
        return record
    record["tpu_custom_call"] = "tpu_custom_call" in exported.mlir_module()
    record["pallas_calls"] = vmem_blocks(fn, *args)
    record["vmem_bytes"] = max((c["vmem_bytes"] for c in record["pallas_calls"]), default=0)
    record["fits_vmem"] = record["vmem_bytes"] <= VMEM_BUDGET_BYTES
    return record
