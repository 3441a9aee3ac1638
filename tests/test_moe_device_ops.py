"""shared/moe/device_ops.py: what a grouped matmul and the dispatches ask of a GPU, counted."""

from functools import partial

import torch

from kernels.moe import grouped_matmul
from shared.benchmarks.moe_routing import per_expert_loop
from shared.check import fresh_seed
from shared.moe import TopKRouter, index_dispatch, sort_dispatch
from shared.moe.device_ops import count_device_ops


def _operands(E, device):
    g = torch.Generator(device=device).manual_seed(fresh_seed())
    sizes = torch.randint(0, 40, (E,), generator=g, device=device)
    x = torch.randn(int(sizes.sum()) + 3, 32, generator=g, device=device)
    return x, torch.randn(E, 32, 48, generator=g, device=device), sizes


def test_grouped_matmul_is_one_triton_launch_and_a_fixed_schedule_whatever_e(device):
    counts = {E: count_device_ops(partial(grouped_matmul, *_operands(E, device)))
              for E in (3, 8, 64)}
    for E, c in counts.items():
        assert c.triton == 1, f"E={E}: {c}"
        assert c.host_syncs == 1, f"E={E}: the checks read min and sum of the sizes, together"
        assert c.torch == counts[3].torch, "the tile schedule must not loop over experts"
    assert 20 <= sum(counts[8].torch.values()) <= 50    # cumsum, searchsorted, ...: not zero


def test_per_expert_loop_launches_one_mm_per_expert_after_one_host_read(device):
    x, w, sizes = _operands(16, device)
    x = x[:int(sizes.sum())]                      # the loop splits exactly the grouped rows
    c = count_device_ops(partial(per_expert_loop, x, w, sizes))
    assert c.triton == 0 and c.torch["mm"] == 16 and c.host_syncs == 1


def test_counting_sees_host_syncs_and_the_backward_kernels(device):
    x, w, sizes = _operands(4, device)
    assert count_device_ops(lambda: int(sizes.sum())).host_syncs == 1
    x.requires_grad_(True)
    w.requires_grad_(True)
    c = count_device_ops(lambda: grouped_matmul(x, w, sizes).sum().backward())
    assert c.triton == 3    # forward, dx (the forward kernel on wᵀ), dw


def test_index_dispatch_reads_nothing_back_and_the_sort_path_does(device):
    g = torch.Generator(device=device).manual_seed(fresh_seed())
    T, D, F, E = 50, 16, 24, 6
    x = torch.randn(T, D, generator=g, device=device)
    route = TopKRouter(D, E, 2).to(device)(x)
    w1 = torch.randn(E, D, 2 * F, generator=g, device=device)
    w2 = torch.randn(E, F, D, generator=g, device=device)
    c = count_device_ops(lambda: index_dispatch(x, route.gates, route.indices, w1, w2, 1.0))
    assert c.host_syncs == 0, c
    c = count_device_ops(lambda: sort_dispatch(x, route.gates, route.indices, w1, w2,
                                               capacity_factor=1.0))
    assert c.host_syncs > 0, "torch's grouped GEMM path reads the offsets back (our wrapper)"
