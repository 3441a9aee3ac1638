"""What a function asks of a GPU, counted on any machine: Triton launches, the torch ops around
them that would each launch a kernel, and host syncs (device values read on the host).

"One launch" for the grouped matmul is one *Triton* launch; the tile schedule around it is built
from torch ops, and its argument checks read the group sizes back. A TorchDispatchMode sees
every aten op a call makes; views and bare allocations launch nothing and are left out; the
Triton kernels are counted by wrapping them for the duration of the call.
"""

from __future__ import annotations

import importlib
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import kernels.device

_SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero"}   # ops that read the device
_NO_KERNEL = {"empty", "empty_strided", "scalar_tensor", "lift_fresh"}  # allocate, launch nothing


@dataclass(frozen=True)
class DeviceOps:
    triton: int           # Triton kernel launches
    torch: Counter        # torch ops that launch a kernel on a GPU, by aten name
    host_syncs: int       # reads of a device value on the host (each one stalls the stream)

    @property
    def launches(self) -> int:
        return self.triton + sum(self.torch.values())


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """A Triton kernel whose launches are counted, run outside the op counter (the interpreter
    moves tensors with torch ops of its own, which a GPU launch would not)."""

    def __init__(self, kernel, counts: Counter):
        self.kernel, self.counts = kernel, counts

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counts["triton"] += 1
            with _disable_current_modes():
                return launch(*args, **kwargs)
        return run


def count_device_ops(fn, module: str = "kernels.moe.grouped_matmul",
                     kernels_: tuple[str, ...] = ("grouped_matmul_kernel",
                                                  "grouped_matmul_dw_kernel")) -> DeviceOps:
    """Run fn() and count what a GPU would be asked to do: Triton launches of the named kernels,
    torch ops that launch a kernel (views and bare allocations excluded), host syncs. Output
    poisoning (a debugging aid, off on a GPU) is switched off while counting."""
    mod = importlib.import_module(module)
    counts: Counter = Counter()
    tolist = torch.Tensor.tolist

    def counted_tolist(t):   # no aten op on a CPU tensor, a device-to-host copy on a GPU one
        counts["tolist"] += 1
        return tolist(t)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(kernels.device, "POISON", False))
        stack.enter_context(mock.patch.object(torch.Tensor, "tolist", counted_tolist))
        for name in kernels_:
            stack.enter_context(mock.patch.object(mod, name,
                                                  _CountedKernel(getattr(mod, name), counts)))
        ops = stack.enter_context(_Ops())
        fn()
    syncs = sum(n for name, n in ops.ops.items() if name in _SYNCS) + counts["tolist"]
    torch_ops = Counter({n: c for n, c in ops.ops.items() if n not in _SYNCS})
    return DeviceOps(counts["triton"], torch_ops, syncs)
