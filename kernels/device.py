"""Where kernels run, decided once, before Triton is imported.

Without a GPU, Triton kernels run in Triton's interpreter and Pallas kernels in interpret mode.
The interpreter is chosen when `triton` is imported and when a kernel is decorated
(docs/cpu-notes.md, "Triton's interpreter"), so `import kernels` calls `configure()` before any
kernel module imports triton.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_TRUE = {"1", "true", "yes", "on"}


def gpu_available() -> bool:
    """A CUDA (or ROCm) device that Triton can compile for."""
    return torch.cuda.is_available()


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in _TRUE


def configure() -> bool:
    """Switch Triton's interpreter on when there is no GPU; return whether it is on.

    Set KC_INTERPRET=1 to force the interpreter on a GPU machine (memory-traffic counting needs
    it). Raises if triton was already imported in the other mode: flipping it afterwards breaks
    tl.sum/tl.max inside kernels.
    """
    want = _flag("KC_INTERPRET", not gpu_available())
    current = _flag("TRITON_INTERPRET", False)
    if "triton" in sys.modules and current != want:
        raise RuntimeError(
            f"triton was imported with TRITON_INTERPRET={int(current)} but this machine needs "
            f"{int(want)}: import kernels (or set TRITON_INTERPRET) before importing triton"
        )
    os.environ["TRITON_INTERPRET"] = "1" if want else "0"
    return want


INTERPRET: bool = configure()
# TPU interpret mode runs each simulated core's program on a thread of XLA:CPU's PjRt client, and
# a core blocked in semaphore_wait holds its thread. The pool is sized by NPROC (default: the CPU
# count), so on 2 CPUs the mega-kernel's 4 waiting cores deadlocked. Read when JAX makes its CPU
# client, so set before any JAX array exists; an explicit NPROC wins.
os.environ.setdefault("NPROC", str(max(os.cpu_count() or 1, 8)))
if INTERPRET:
    # The interpreter evaluates masked-off lanes with numpy too (−inf − −inf and the like);
    # their results are discarded, but numpy warns. Silence only the interpreter's module.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\..*")
# Poison fresh outputs with NaN so unwritten elements show. Cheap next to the interpreter, so on
# by default there; on a GPU it costs a fill kernel per output, so opt in with KC_POISON=1.
POISON: bool = _flag("KC_POISON", INTERPRET)


_compile_target: str | None = None  # set inside kernels.compile_only.compile_only


def target() -> str | None:
    """The GPU the Triton launchers choose configs for: "sm_80", "sm_90", ... (the target of an
    enclosing `compile_only`, else the visible GPU), or None under the interpreter."""
    if _compile_target is not None:
        return _compile_target
    if INTERPRET or not gpu_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def capability() -> int:
    """target() as an int (80, 90, ...); 0 under the interpreter, where configs do not matter
    for speed and the portable (smallest) config is the one to test."""
    t = target()
    return 0 if t is None else int(t.removeprefix("sm_"))


# SMs per target when the launch does not ask the GPU (no GPU, or a compile target). The
# interpreter runs one program at a time, so there the "machine" is taken as 8 programs wide:
# split heuristics then still split the small test shapes, each split cheap to test.
SM_COUNT = {0: 8, 80: 108, 90: 132}


def target_sm_count() -> int:
    """SM_COUNT's row for the current target (Hopper's for targets not listed)."""
    return SM_COUNT.get(capability(), SM_COUNT[90])


def compile_only(target_name: str):
    """Compile every Triton launch in the block for `target_name` without running it; yields
    the list of compiled kernels (kernels.compile_only explains; needs KC_INTERPRET=0)."""
    from kernels.compile_only import compile_only as impl

    return impl(target_name)


def pallas_interpret() -> bool:
    """Pass as `interpret=` to pallas_call: True when JAX has only the CPU.

    KC_INTERPRET=0 on a CPU machine means "lower for real hardware": pallas_call is then built
    with interpret=False, so `jax.export(..., platforms=["tpu"])` runs the Mosaic TPU lowering.
    """
    import jax

    return _flag("KC_INTERPRET", jax.default_backend() == "cpu")


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel's output; poisoned (NaN, or the dtype's max for ints) when POISON."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else _int_sentinel(dtype))
    return out


def _int_sentinel(dtype: torch.dtype) -> int:
    return True if dtype == torch.bool else torch.iinfo(dtype).max
