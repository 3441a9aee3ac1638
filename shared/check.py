"""Correctness against a float64 reference: relative error, tolerances by dtype, seeds.

Every kernel in the project is checked the same way (docs/claims.md, "Measuring honestly"):
‖out − ref‖ / ‖ref‖ computed in float64, against a tolerance chosen by the dtype the kernel
computed in, and by whether fp32 matmuls may run as TF32 (a GPU) or exactly (the interpreter).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from kernels.device import INTERPRET, gpu_available

# Relative-error budgets. 16-bit formats keep 10 (fp16) or 7 (bf16) mantissa bits and the
# kernels round P or partial sums to them. fp32 is exact fp32 everywhere except in a matrix
# product on a GPU: there tl.dot (and Pallas's dot) defaults to TF32, whose 10-bit mantissa is
# fp16's, so a matmul kernel's fp32 result gets fp16's budget (see `tolerance`).
_TOLERANCE = {
    "float64": 1e-12,
    "float32": 2e-5,
    "float16": 5e-3,
    "bfloat16": 3e-2,
}
_TF32 = _TOLERANCE["float16"]
_16_BIT = ("float16", "bfloat16")


def _dtype_name(dtype) -> str:
    """'float32' for torch.float32, np.float32, jnp.float32 or the string itself."""
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def kernel_device() -> str:
    """Where the kernels run: "cuda" when a GPU is there and Triton is not forced into its
    interpreter (KC_INTERPRET=1), else "cpu". Tests and labs create inputs and generators here."""
    return "cuda" if gpu_available() and not INTERPRET else "cpu"


def kernel_dtypes(device=None) -> tuple[torch.dtype, ...]:
    """The float dtypes to test the kernels in on `device` (default: kernel_device()).

    bf16 only on CUDA: Triton's interpreter computes bf16 on the raw bits (docs/cpu-notes.md,
    "Triton's interpreter"), a documented restriction of the CPU path, so the CPU list leaves
    it out instead of skipping."""
    device = torch.device(device if device is not None else kernel_device())
    base = (torch.float32, torch.float16)
    return (*base, torch.bfloat16) if device.type == "cuda" else base


def _on_gpu(where) -> bool:
    """Whether `where` (a torch device or its name, a torch tensor, a jax array, or None for
    the kernels' device) is a GPU; host arrays (numpy) are not."""
    if where is None:
        return kernel_device() == "cuda"
    if isinstance(where, torch.Tensor):
        return where.is_cuda
    if isinstance(where, str | torch.device):
        return torch.device(where).type == "cuda"
    devices = getattr(where, "devices", None)  # a jax array
    return callable(devices) and any(d.platform == "gpu" for d in devices())


def tolerance(dtype, *, matmul: bool = False, device=None) -> float:
    """Relative-error tolerance for results computed in `dtype` (torch, numpy or jax dtype).

    matmul=True marks a result that went through a kernel's matrix product (tl.dot, pl.dot):
    in fp32 on a GPU (`device`, default kernel_device()) that product is TF32, so the budget
    is fp16's; in the interpreter and on the CPU it stays exact fp32's."""
    name = _dtype_name(dtype)
    if name not in _TOLERANCE:
        raise ValueError(f"dtype must be one of {sorted(_TOLERANCE)}, got {dtype}")
    if name == "float32" and matmul and not INTERPRET and _on_gpu(device):
        return _TF32
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


def assert_close(out, ref, *, dtype=None, tol: float | None = None, matmul: bool = False,
                 what: str = "output") -> float:
    """Assert rel_error(out, ref) ≤ tol (default: tolerance(dtype or out.dtype, matmul=matmul)
    on out's device); return it."""
    if tol is None:
        tol = tolerance(dtype if dtype is not None else out.dtype, matmul=matmul, device=out)
    err = rel_error(out, ref)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds tolerance {tol:.1e}")
    return err


def _rounding_error(ref, dtype) -> float:
    """Relative error of the float64 reference rounded to `dtype`: what storing it costs."""
    ref64 = torch.from_numpy(to_float64(ref))
    return rel_error(ref64.to(getattr(torch, _dtype_name(dtype))), ref64)


def assert_within_peer(out, ref, peer, *, factor: float = 2.0, what: str = "output"
                       ) -> tuple[float, float]:
    """FlashAttention's test criterion: out's error is at most `factor` × a same-dtype peer's
    (e.g. the PyTorch reference run in out's dtype), both against the float64 `ref`, plus a
    slack of the error of `ref` rounded to out's dtype (FA3's tests add the same kind of
    term, so a peer that happens to round luckier cannot fail an exactly rounded result).
    Returns (out's error, peer's error)."""
    err, peer_err = rel_error(out, ref), rel_error(peer, ref)
    bound = factor * peer_err + _rounding_error(ref, out.dtype)
    if not err <= bound:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds {factor}x the same-dtype "
                             f"peer's {peer_err:.3e} (+ rounding slack): bound {bound:.3e}")
    return err, peer_err


def assert_close_to_reference(out, ref, *, peer=None, matmul: bool = False,
                              what: str = "output") -> float:
    """The one check for a kernel result against its float64 reference, chosen by device.

    On a GPU, a 16-bit result with a `peer` (a tensor, or a function returning one, computed
    only when needed) is judged by `assert_within_peer`: how much worse than the framework in
    the same dtype. Everywhere else (the interpreter, fp32, no peer): `assert_close` with the
    dtype's tolerance, TF32's for an fp32 `matmul` result on a GPU. Returns out's error."""
    name = _dtype_name(out.dtype)
    if peer is not None and name in _16_BIT and not INTERPRET and _on_gpu(out):
        return assert_within_peer(out, ref, peer() if callable(peer) else peer, what=what)[0]
    return assert_close(out, ref, matmul=matmul, what=what)


def seed_everything(seed: int) -> int:
    """Seed Python, numpy and torch; return the seed (JAX takes explicit keys instead)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def fresh_seed() -> int:
    """A new seed on every call (fresh inputs each check), from KC_SEED if set, to replay one."""
    if "KC_SEED" in os.environ:
        return int(os.environ["KC_SEED"])
    return int.from_bytes(os.urandom(4), "little")
