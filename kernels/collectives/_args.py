"""Argument checks and the interpret-mode switch shared by the fused collective kernels."""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from kernels.device import pallas_interpret


def check_2d(a, name: str) -> None:
    if not hasattr(a, "shape") or len(a.shape) != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {getattr(a, 'shape', None)}")
    if not jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
        raise TypeError(f"{name} must be floating point, got {a.dtype}")


def interpret_params(detect_races: bool = False):
    """TPU interpret mode (simulated remote DMAs, semaphores and barriers) on a CPU; False (the
    real Mosaic lowering) when kernels.device says Pallas compiles for real."""
    if not pallas_interpret():
        return False
    return pltpu.InterpretParams(detect_races=detect_races)


def races_found(result) -> bool:
    """Whether TPU interpret mode's race detector (detect_races=True) saw a race in the kernel
    that produced `result`. Waits for `result` first: dispatch is asynchronous, and the
    detector's state is only final once the kernel has run. The state lives in a private jax
    module (jax 0.10), read here and nowhere else."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interp

    jax.block_until_ready(result)
    return bool(interp.races is not None and interp.races.races_found)
