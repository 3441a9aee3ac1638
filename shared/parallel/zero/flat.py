"""A unit of parameters laid out as one flat buffer, padded so it splits into Nd equal shards.

ZeRO (Rajbhandari et al. 2020, §5) partitions every model state into Nd equal parts; a flat
buffer per unit (one transformer block, or the embedding with its tied head) makes each
part a contiguous slice, so a reduce-scatter or all-gather moves one tensor. The module keeps
its Parameters (leaves: autograd, tied weights and hooks work as usual) but their `.data`
are views into `full`. Freeing the unit resizes `full`'s storage to zero bytes: every view,
including the transposed views autograd saved for the backward, loses its memory at once, and
re-gathering into the same storage brings them back (FSDP's trick; swapping `p.data` alone
would leave those saved views holding the old storage alive).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.device import POISON


class FlatUnit:
    """`params` (trainable, distinct) as one flat buffer of `padded` elements of `dtype`.

    shard_size = padded / world; rank r owns elements [r * shard_size, (r + 1) * shard_size).
    """

    def __init__(self, name: str, params: list[nn.Parameter], world: int, rank: int,
                 dtype: torch.dtype):
        if not params:
            raise ValueError(f"unit {name!r} has no trainable parameters")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"unit {name!r} lists a parameter twice (tied weights go in once)")
        if not all(p.requires_grad for p in params):
            raise ValueError(f"unit {name!r} holds a frozen parameter: frozen ones stay outside")
        self.name, self.params, self.world, self.rank, self.dtype = (
            name, params, world, rank, dtype)
        self.numel = sum(p.numel() for p in params)
        self.shard_size = -(-self.numel // world)
        self.padded = self.shard_size * world
        self.full = torch.zeros(self.padded, dtype=dtype, device=params[0].device)
        with torch.no_grad():
            self.full[:self.numel].copy_(torch.cat([p.detach().reshape(-1) for p in params]))
        self._bind()

    def _bind(self) -> None:
        """Point each parameter's data at its slice of `full`."""
        offset = 0
        for p in self.params:
            p.data = self.full[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()

    def my_slice(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a flat buffer of `padded` elements (a view)."""
        return flat[self.rank * self.shard_size:(self.rank + 1) * self.shard_size]

    @property
    def gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def free(self) -> None:
        """Release the full parameters' memory (the views stay, with no storage)."""
        self.full.untyped_storage().resize_(0)

    def allocate(self) -> torch.Tensor:
        """Give `full` its memory back and return it, NaN-filled when poisoning is on (the
        allocator may hand back the old values, which would hide a gather that never came)."""
        self.full.untyped_storage().resize_(self.padded * self.full.element_size())
        if POISON:
            self.full.fill_(float("nan"))
        return self.full

    def flat_grad(self) -> torch.Tensor:
        """The parameters' gradients as one padded flat tensor (zeros in the padding)."""
        flat = torch.zeros(self.padded, dtype=self.params[0].grad.dtype,
                           device=self.full.device)
        torch.cat([p.grad.reshape(-1) for p in self.params], out=flat[:self.numel])
        return flat

    def grads_as_views(self) -> torch.Tensor:
        """Make every p.grad a view into one zeroed flat buffer (returned): autograd then
        accumulates in place, and the buffer is all-reduced as one tensor (DDP's
        gradient_as_bucket_view)."""
        flat = torch.zeros(self.padded, dtype=self.dtype, device=self.full.device)
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        return flat


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr() or id(s)] = s.nbytes()
    return sum(seen.values())
