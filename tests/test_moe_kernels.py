"""kernels/moe: grouped matmul (Triton, Pallas), permute/unpermute, routing, balancing loss."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.moe import (
    Blocks,
    grouped_matmul,
    grouped_matmul_reference,
    load_balancing_loss,
    permute,
    permute_reference,
    routing_map,
    topk_route,
    unpermute,
    unpermute_reference,
)
from kernels.moe.grouped_matmul import default_blocks, tile_schedule
from kernels.moe.grouped_matmul_pallas import PallasBlocks, grouped_matmul_pallas
from shared.check import assert_close, fresh_seed, kernel_device, kernel_dtypes

# small tiles so odd sizes straddle several of them; groups of 2 row tiles in the program order
SMALL = Blocks(m=16, n=32, k=16, group_m=2)
HALF = [d for d in kernel_dtypes(kernel_device()) if d != torch.float32]  # bf16 only on CUDA


def _operands(sizes, K, N, dtype, device="cpu", seed=0, extra_rows=0):
    g = torch.Generator(device=device).manual_seed(seed)
    M = sum(sizes) + extra_rows
    x = torch.randn(M, K, generator=g, device=device).to(dtype)
    w = torch.randn(len(sizes), K, N, generator=g, device=device).to(dtype)
    return x, w, torch.tensor(sizes, device=device)


@settings(max_examples=4)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       extra=st.integers(0, 5), K=st.integers(1, 40), N=st.integers(1, 70))
def test_grouped_matmul_forward_backward_fp32(sizes, extra, K, N, device):
    seed = fresh_seed()
    x, w, gs = _operands(sizes, K, N, torch.float32, device, seed, extra)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = grouped_matmul(x, w, gs, blocks=SMALL)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = grouped_matmul_reference(x64, w64, gs)
    # tl.dot: exact fp32 in the interpreter, TF32 on a GPU (matmul=True)
    assert_close(out, ref, matmul=True, what=f"out (seed {seed})")
    dy = torch.randn(out.shape, device=device,
                     generator=torch.Generator(device=device).manual_seed(seed + 1))
    dx, dw = torch.autograd.grad(out, (x, w), dy)
    rx, rw = torch.autograd.grad(ref, (x64, w64), dy.double())
    assert_close(dx, rx, matmul=True, what=f"dx (seed {seed})")
    assert_close(dw, rw, matmul=True, what=f"dw (seed {seed})")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_grouped_matmul_16bit_default_blocks_and_empty_groups(dtype, device):
    seed = fresh_seed()
    x, w, gs = _operands([0, 70, 0, 3, 0], 48, 80, dtype, device, seed, extra_rows=9)
    out = grouped_matmul(x, w, gs)
    assert_close(out, grouped_matmul_reference(x.double(), w.double(), gs),
                 what=f"out (seed {seed})")
    assert torch.all(out[73:] == 0), "rows past the groups must be zero (ragged_dot)"


@pytest.mark.parametrize("group_m", [1, 3, 64])
def test_grouped_program_order_writes_every_tile_once(group_m, device):
    """The forward's grouped program order over (row tile, column tile), in groups of 1 row
    tile, of 3 (the last group shorter: 11 tile slots) and of more than there are; outputs are
    poisoned under the interpreter, so a tile never written, or written twice wrongly, fails."""
    seed = fresh_seed()
    x, w, gs = _operands([37, 0, 50, 9], 20, 100, torch.float32, device, seed, extra_rows=3)
    blocks = Blocks(m=16, n=32, k=16, group_m=group_m)
    out = grouped_matmul(x, w, gs, blocks=blocks)
    assert_close(out, grouped_matmul_reference(x.double(), w.double(), gs), matmul=True,
                 what=f"group_m={group_m} (seed {seed})")


def test_default_blocks_per_target(monkeypatch):
    # the module, not the function kernels.moe exports under the same name
    gm = importlib.import_module("kernels.moe.grouped_matmul")
    for cap, half, full in ((0, Blocks(), Blocks()),
                            (80, Blocks(128, 128, 32, warps=8), Blocks()),
                            (90, Blocks(128, 128, 64, warps=8), Blocks())):
        monkeypatch.setattr(gm, "capability", lambda cap=cap: cap)
        assert default_blocks(torch.bfloat16) == half
        assert default_blocks(torch.float16) == half
        assert default_blocks(torch.float32) == full


def test_tile_schedule_covers_every_row_once_and_never_mixes_groups(device):
    gs = torch.tensor([5, 0, 33, 16, 1], device=device)
    start, end, group = tile_schedule(gs, 60, 16)
    gs = gs.cpu()
    assert len(start) == -(-60 // 16) + 5           # the static bound, no host sync
    covered = torch.zeros(60, dtype=torch.int64)
    offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), gs, torch.tensor([5])]), 0)
    for s, e, g in zip(start.tolist(), end.tolist(), group.tolist(), strict=True):
        assert e - s <= 16
        covered[s:e] += 1
        if e > s:
            assert offsets[g] <= s and e <= offsets[g + 1], "a tile crossed a group boundary"
    assert torch.all(covered == 1)


@pytest.mark.usefixtures("tpu_interpret_on_cpu")   # a TPU kernel: interpret mode on the CPU
def test_grouped_matmul_matches_jax_ragged_dot_and_pallas(device):
    rng = np.random.default_rng(fresh_seed())
    sizes = np.array([9, 0, 30, 2], np.int32)
    M, K, N = int(sizes.sum()) + 4, 24, 40
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((4, K, N)).astype(np.float32)
    dy = rng.standard_normal((M, N)).astype(np.float32)
    blocks = PallasBlocks(m=16, n=128)
    hi = jax.lax.Precision.HIGHEST

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * dy)

    ours = loss(lambda x, w: grouped_matmul_pallas(x, w, jnp.asarray(sizes), blocks=blocks))
    theirs = loss(lambda x, w: jax.lax.ragged_dot(x, w, jnp.asarray(sizes), precision=hi))
    out = grouped_matmul_pallas(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), blocks=blocks)
    ref = grouped_matmul_reference(torch.tensor(x).double(), torch.tensor(w).double(),
                                   torch.tensor(sizes))
    assert_close(out, ref, dtype=jnp.float32, what="pallas out")
    triton = grouped_matmul(*(torch.tensor(a, device=device) for a in (x, w, sizes)))
    assert_close(triton, ref, matmul=True, what="triton out")   # TF32 on a GPU
    for got, want, name in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(theirs, (0, 1))(x, w),
                               ("dx", "dw"), strict=True):
        assert_close(got, want, dtype=jnp.float32, what=f"pallas {name}")


@pytest.mark.usefixtures("tpu_interpret_on_cpu")
def test_grouped_matmul_pallas_bf16_against_float64():
    rng = np.random.default_rng(seed := fresh_seed())
    sizes = np.array([20, 0, 37, 5], np.int32)
    M, K, N = int(sizes.sum()) + 3, 40, 72
    x, w, dy = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
                for s in ((M, K), (4, K, N), (M, N)))
    f = lambda x, w: grouped_matmul_pallas(x, w, jnp.asarray(sizes), blocks=PallasBlocks(16, 128))
    out, pull = jax.vjp(f, x, w)
    x64, w64 = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, w))
    ref = grouped_matmul_reference(x64, w64, torch.tensor(sizes))
    ref.backward(torch.tensor(np.asarray(dy, np.float64)))
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, dtype=jnp.bfloat16, what=f"pallas bf16 out (seed {seed})")
    for got, want, name in zip(pull(dy), (x64.grad, w64.grad), ("dx", "dw"), strict=True):
        assert got.dtype == jnp.bfloat16
        assert_close(got, want, dtype=jnp.bfloat16, what=f"pallas bf16 {name} (seed {seed})")


def test_grouped_matmul_pallas_refuses_a_gpu(monkeypatch):
    monkeypatch.setenv("KC_PALLAS_TARGET", "gpu")   # no scalar prefetch in the Triton lowering
    x = jnp.zeros((8, 16))
    with pytest.raises(RuntimeError, match="grouped_matmul_pallas is a TPU kernel"):
        grouped_matmul_pallas(x, jnp.zeros((2, 16, 8)), jnp.array([3, 5]))


def test_grouped_matmul_bad_input(device):
    x, w, gs = _operands([3, 4], 8, 8, torch.float32, device)
    with pytest.raises(ValueError, match="w has K"):
        grouped_matmul(x, torch.randn(2, 9, 8, device=device), gs)
    with pytest.raises(ValueError, match="group_sizes has 3"):
        grouped_matmul(x, w, torch.tensor([3, 4, 0], device=device))
    with pytest.raises(ValueError, match="sum to 8"):
        grouped_matmul(x, w, torch.tensor([4, 4], device=device))
    with pytest.raises(ValueError, match="non-negative"):
        grouped_matmul(x, w, torch.tensor([-1, 4], device=device))
    with pytest.raises(TypeError, match="group_sizes"):
        grouped_matmul(x, w, torch.tensor([3.0, 4.0], device=device))
    with pytest.raises(ValueError, match="multiple of 128"):
        PallasBlocks(m=8, n=64)
    with pytest.raises(ValueError, match="power of two"):
        Blocks(m=24)
    with pytest.raises(ValueError, match="group_m"):
        Blocks(group_m=0)
    with pytest.raises(ValueError, match="warps"):
        Blocks(warps=True)


@settings(max_examples=5)
@given(T=st.integers(1, 50), D=st.integers(1, 200), E=st.integers(1, 9), k=st.integers(1, 3))
def test_permute_unpermute_match_reference_with_gradients(T, D, E, k, device):
    k = min(k, E)
    gen = torch.Generator(device=device).manual_seed(fresh_seed())
    route = topk_route(torch.randn(T, E, generator=gen, device=device), k, renormalize=True)
    x = torch.randn(T, D, generator=gen, device=device, requires_grad=True)
    xs, gs, pos = permute(x, route.indices, E)
    xr, gr, pr = permute_reference(x, route.indices, E)
    assert torch.equal(xs, xr) and torch.equal(gs, gr) and torch.equal(pos, pr)
    assert torch.equal(xs[pos.reshape(-1)], x.repeat_interleave(k, 0)), "positions invert order"
    dxs = torch.randn(xs.shape, generator=gen, device=device)
    assert_close(torch.autograd.grad(xs, x, dxs)[0], torch.autograd.grad(xr, x, dxs)[0],
                 dtype=torch.float32, what="permute dx")
    ys = torch.randn(T * k, D, generator=gen, device=device, requires_grad=True)
    g = route.gates.clone().requires_grad_(True)
    y, yr = unpermute(ys, pos, g), unpermute_reference(ys.double(), pos, g.double())
    assert_close(y, yr, dtype=torch.float32, what="unpermute")
    dy = torch.randn(T, D, generator=gen, device=device)
    for a, b, name in zip(torch.autograd.grad(y, (ys, g), dy),
                          torch.autograd.grad(yr, (ys, g), dy.double()), ("d_ys", "d_gates"),
                          strict=True):
        assert_close(a, b, dtype=torch.float32, what=name)


def test_routing_map_groups_are_contiguous_and_stable(device):
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]], device=device)
    rmap = routing_map(idx, 4)
    assert rmap.group_sizes.tolist() == [3, 2, 3, 0]
    assert (idx.reshape(-1)[rmap.order]).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert rmap.order.tolist() == [1, 2, 6, 3, 5, 0, 4, 7]   # token order kept inside a group


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_balancing_loss_is_one_at_uniform_routing_for_any_k(k, device):
    E, T = 8, 64
    # Each token picks k consecutive experts, round robin: every expert gets T·k/E assignments.
    idx = (torch.arange(T, device=device)[:, None] + torch.arange(k, device=device)[None, :]) % E
    uniform = torch.full((T, E), 1.0 / E, device=device)
    assert load_balancing_loss(uniform, idx, E).item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator(device=device).manual_seed(fresh_seed())
    probs = torch.softmax(torch.randn(T, E, generator=g, device=device), -1)  # any P: still 1
    assert load_balancing_loss(probs, idx, E).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(T, E, device=device)
    collapsed[:, :k] = 1.0 / k                      # everyone to the same k experts
    same = torch.arange(k, device=device).expand(T, k)
    assert load_balancing_loss(collapsed, same, E).item() == pytest.approx(E / k, rel=1e-6)


@settings(max_examples=10)
@given(counts=st.lists(st.integers(0, 30), min_size=2, max_size=10).filter(lambda c: sum(c) > 0))
def test_load_balancing_loss_above_one_when_probabilities_follow_the_load(counts, device):
    E = len(counts)
    idx = torch.repeat_interleave(torch.arange(E, device=device),
                                  torch.tensor(counts, device=device))[:, None]
    f = torch.tensor(counts, dtype=torch.float32, device=device) / sum(counts)
    probs = f.expand(len(idx), E)                   # P = f: the router believes its choices
    loss = load_balancing_loss(probs, idx, E).item()
    assert loss == pytest.approx(E * float((f * f).sum()), rel=1e-5)
    balanced = len(set(counts)) == 1
    assert loss == pytest.approx(1.0, rel=1e-5) if balanced else loss > 1.0


def test_topk_route_bad_input_and_renormalisation(device):
    logits = torch.randn(5, 4, device=device,
                         generator=torch.Generator(device=device).manual_seed(fresh_seed()))
    with pytest.raises(ValueError, match="k must be"):
        topk_route(logits, 5)
    r = topk_route(logits, 2, renormalize=True)
    assert torch.allclose(r.gates.sum(-1), torch.ones(5, device=device))
    assert torch.equal(r.indices, torch.topk(logits, 2).indices)
    with pytest.raises(ValueError, match="router_probs has 4 experts"):
        load_balancing_loss(r.probs, r.indices, 5)


def test_grouped_matmul_bf16_refused_by_the_interpreter_and_computed_on_a_gpu(device):
    from kernels.device import INTERPRET

    x = torch.randn(10, 16, dtype=torch.bfloat16, device=device)
    w = torch.randn(2, 16, 8, dtype=torch.bfloat16, device=device)
    sizes = torch.tensor([4, 6], device=device)
    if INTERPRET:  # the interpreter computes bf16 on the raw bits: refused, not wrong
        with pytest.raises(TypeError, match="x must have dtype"):
            grouped_matmul(x, w, sizes)
    else:
        ref = torch.cat([x[:4].double() @ w[0].double(), x[4:].double() @ w[1].double()])
        out = grouped_matmul(x, w, sizes).double()
        assert (out - ref).norm() / ref.norm() < 2e-2
