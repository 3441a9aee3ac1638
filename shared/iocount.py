"""Count a Triton kernel's global-memory traffic and tl.dot FLOPs, exactly, in the interpreter.

Triton's interpreter executes every tl.load / tl.store / tl.dot in Python (docs/cpu-notes.md,
"Triton's interpreter"), so wrapping those three builder calls sees all traffic between the
kernel and global memory (HBM on a GPU). A masked load or store moves only its active lanes, so
only those are counted: the number is what the kernel asks of memory, before caches. It does not
model L2 hits, so it is the traffic of a GPU with no cache reuse across programs, which is what
the papers' IO analyses count too.

    with iocount.count() as c:
        softmax(x)
    c.bytes_loaded, c.bytes_stored, c.dot_flops, c.by_kernel["softmax_online_kernel"]
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from kernels.device import INTERPRET


@dataclass
class Traffic:
    launches: int = 0
    programs: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0
    dot_flops: int = 0

    @property
    def bytes_total(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    def _add(self, **delta: int) -> None:
        for key, value in delta.items():
            setattr(self, key, getattr(self, key) + value)


@dataclass
class Count(Traffic):
    """Totals over a `with count()` block, and the same per kernel (by Python function name)."""

    by_kernel: dict[str, Traffic] = field(default_factory=dict)

    def _add_for(self, kernel: str, **delta: int) -> None:
        self._add(**delta)
        self.by_kernel.setdefault(kernel, Traffic())._add(**delta)


_active: list[Count] = []   # nested `count()` blocks all see the traffic
_kernel: list[str] = ["?"]  # the kernel being interpreted now


def _record(**delta: int) -> None:
    for c in _active:
        c._add_for(_kernel[-1], **delta)


def _nbytes(ptrs, mask) -> int:
    itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
    return int(mask.data.sum()) * itemsize


def _install() -> None:
    """Wrap the interpreter's memory and dot builders once; a no-op outside `count()`."""
    from triton.runtime import interpreter as I

    B = I.InterpreterBuilder
    if getattr(B, "_kc_counted", False):
        return
    load, store, dot = B.create_masked_load, B.create_masked_store, B.create_dot
    rmw, cas, call = B.create_atomic_rmw, B.create_atomic_cas, I.GridExecutor.__call__
    set_grid = B.set_grid_dim

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        if _active:
            _record(bytes_loaded=_nbytes(ptrs, mask))
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        if _active:
            _record(bytes_stored=_nbytes(ptrs, mask))
        return store(self, ptrs, value, mask, cache_policy)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if _active:
            *batch, m, k = a.data.shape
            n = b.data.shape[-1]
            size = 1
            for s in batch:
                size *= s
            _record(dot_flops=2 * size * m * n * k)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def create_atomic_rmw(self, op, ptr, val, mask, sem, scope):
        if _active:  # read-modify-write: each active lane reads and writes its element
            n = _nbytes(ptr, mask)
            _record(bytes_loaded=n, bytes_stored=n)
        return rmw(self, op, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        if _active:
            n = ptr.data.size * (ptr.get_element_ty().primitive_bitwidth // 8)
            _record(bytes_loaded=n, bytes_stored=n)
        return cas(self, ptr, cmp, val, sem, scope)

    def set_grid_dim(self, nx, ny, nz):
        if _active:
            _record(launches=1, programs=nx * ny * nz)
        return set_grid(self, nx, ny, nz)

    def grid_call(self, *args, **kwargs):
        _kernel.append(getattr(self.fn, "__name__", "?"))
        try:
            return call(self, *args, **kwargs)
        finally:
            _kernel.pop()

    B.create_masked_load, B.create_masked_store, B.create_dot = (
        create_masked_load, create_masked_store, create_dot)
    B.create_atomic_rmw, B.create_atomic_cas, B.set_grid_dim = (
        create_atomic_rmw, create_atomic_cas, set_grid_dim)
    I.GridExecutor.__call__ = grid_call
    B._kc_counted = True


@contextmanager
def count():
    """Count the traffic of every Triton kernel launched inside the block."""
    if not INTERPRET:
        raise RuntimeError("iocount needs Triton's interpreter: run with KC_INTERPRET=1 "
                           "(set before `import kernels`)")
    _install()
    c = Count()
    _active.append(c)
    try:
        yield c
    finally:
        _active[:] = [a for a in _active if a is not c]  # by identity: Counts compare equal
