"""Who is in the group, where I sit in it, and the checks every collective makes first."""

from __future__ import annotations

import torch
import torch.distributed as dist


def members(group) -> tuple[list[int], int]:
    """(global ranks of the group in group order, my index in it)."""
    if group is None:
        ranks = list(range(dist.get_world_size()))
    else:
        ranks = dist.get_process_group_ranks(group)
    return ranks, dist.get_rank(group)


def check_tensor(t, name: str = "t") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point (SUM in its dtype), got {t.dtype}")


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of `t` to reduce in place (a copy when `t` is not contiguous; the caller
    copies it back)."""
    return t.view(-1) if t.is_contiguous() else t.reshape(-1).clone()


def reduce_in_place(t: torch.Tensor, group, body) -> torch.Tensor:
    """The frame every all-reduce here shares: check `t`, find my place in the group, run
    body(flat, ranks, me) on a 1-D view of it (nothing to do for one rank or no elements), and
    copy back into a non-contiguous `t`. Returns `t`, as torch.distributed's in-place SUM."""
    check_tensor(t)
    ranks, me = members(group)
    if len(ranks) == 1 or t.numel() == 0:
        return t
    flat = flat_view(t)
    body(flat, ranks, me)
    if flat.data_ptr() != t.data_ptr():
        t.copy_(flat.view(t.shape))
    return t
