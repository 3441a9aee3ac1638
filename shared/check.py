"""Correctness against a float64 reference: relative error, tolerances by dtype, seeds.

Every kernel in the project is checked the same way (DESIGN.md, "Measuring honestly"):
‖out − ref‖ / ‖ref‖ computed in float64, against a tolerance chosen by the dtype the kernel
computed in, and by whether fp32 matmuls may run as TF32 (a GPU) or exactly (the interpreter).
"""

from __future__ import annotations

import os
import random

import numpy as np

from kernels.device import INTERPRET

# Relative-error budgets. fp32 is exact fp32 in the interpreter but TF32 (10-bit mantissa) in
# tl.dot on a GPU by default; 16-bit formats keep 10 (fp16) or 7 (bf16) mantissa bits and the
# kernels round P or partial sums to them.
_TOLERANCE = {
    "float64": 1e-12,
    "float32": 2e-5 if INTERPRET else 5e-3,
    "float16": 5e-3,
    "bfloat16": 3e-2,
}


def _dtype_name(dtype) -> str:
    """'float32' for torch.float32, np.float32, jnp.float32 or the string itself."""
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def tolerance(dtype) -> float:
    """Relative-error tolerance for results computed in `dtype` (torch, numpy or jax dtype)."""
    name = _dtype_name(dtype)
    if name not in _TOLERANCE:
        raise ValueError(f"dtype must be one of {sorted(_TOLERANCE)}, got {dtype}")
    return _TOLERANCE[name]


def to_float64(x) -> np.ndarray:
    """torch tensor, jax array or array-like → float64 numpy array (no gradient, on the host)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_error(out, ref) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ in float64; infinite if `out` has a NaN or ±inf where `ref` has not.

    Elements where both hold the same infinity count as equal (a masked score of −inf).
    """
    out, ref = to_float64(out), to_float64(ref)
    if out.shape != ref.shape:
        raise ValueError(f"out has shape {out.shape} but ref has shape {ref.shape}")
    same = (out == ref) | (np.isnan(out) & np.isnan(ref))
    if not np.all(np.isfinite(out) | same):
        return float("inf")
    with np.errstate(invalid="ignore"):  # inf − inf where `same` masks it anyway
        diff = np.where(same, 0.0, out - ref)
    ref_finite = np.where(np.isfinite(ref), ref, 0.0)
    denom = np.linalg.norm(ref_finite)
    num = np.linalg.norm(diff)
    return float(num / denom) if denom > 0 else float(num)


def assert_close(out, ref, *, dtype=None, tol: float | None = None, what: str = "output") -> float:
    """Assert rel_error(out, ref) ≤ tol (default: tolerance(dtype or out.dtype)); return it."""
    if tol is None:
        tol = tolerance(dtype if dtype is not None else out.dtype)
    err = rel_error(out, ref)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds tolerance {tol:.1e}")
    return err


def seed_everything(seed: int) -> int:
    """Seed Python, numpy and torch; return the seed (JAX takes explicit keys instead)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def fresh_seed() -> int:
    """A new seed on every call (fresh inputs each check), from KC_SEED if set, to replay one."""
    if "KC_SEED" in os.environ:
        return int(os.environ["KC_SEED"])
    return int.from_bytes(os.urandom(4), "little")
