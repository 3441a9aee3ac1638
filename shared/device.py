"""The machine a lab runs on: accelerator, problem scale, a name for the claims table."""

from __future__ import annotations

import os
import platform

from kernels.device import INTERPRET, gpu_available, pallas_interpret

__all__ = ["INTERPRET", "gpu_available", "pallas_interpret", "scale", "pick", "hardware_name"]

SCALES = ("ci", "full")


def scale() -> str:
    """Problem sizes: KC_SCALE=ci|full; `ci` by default without a GPU, `full` with one."""
    value = os.environ.get("KC_SCALE", "full" if gpu_available() else "ci").strip().lower()
    if value not in SCALES:
        raise ValueError(f"KC_SCALE must be one of {SCALES}, got {value!r}")
    return value


def pick(*, ci, full):
    """The value for the current scale: `n = pick(ci=512, full=16384)`."""
    return ci if scale() == "ci" else full


def hardware_name() -> str:
    """What measured numbers were measured on, e.g. 'CPU x86_64, 2 cores (Triton interpreter)'."""
    if gpu_available():
        import torch

        name = torch.cuda.get_device_name()
        return f"{name} (Triton interpreter)" if INTERPRET else name
    cores = os.cpu_count()
    return f"CPU {platform.machine()}, {cores} cores"
