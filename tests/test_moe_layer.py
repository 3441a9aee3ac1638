"""shared/moe: routers, the two dispatches, the layer, and the Mixtral comparison."""

import pytest
import torch

from kernels.moe import load_balancing_loss, topk_route
from shared.check import assert_close, fresh_seed, seed_everything
from shared.moe import (
    BiasBalancedRouter,
    HashRouter,
    MoELayer,
    SwitchRouter,
    TopKRouter,
    capacity,
    capacity_slots,
    moe_aux_loss,
    sort_dispatch,
    token_ids,
)
from shared.moe.hf_mixtral import mixtral_block

D, F, E = 24, 40, 6


def _randn(*shape, device, seed=None):
    """Fresh inputs on the test's device, from a generator there."""
    g = torch.Generator(device=device).manual_seed(fresh_seed() if seed is None else seed)
    return torch.randn(shape, generator=g, device=device)


def _routers():
    return {"topk": TopKRouter(D, E, 2), "switch": SwitchRouter(D, E),
            "bias": BiasBalancedRouter(D, E, 3), "hash": HashRouter(D, E)}


def _grads(layer, x, ids):
    y = layer(x, ids)
    loss = (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum() + \
        layer.aux_loss
    params = [p for p in layer.parameters()]
    return y, torch.autograd.grad(loss, [x, *params], allow_unused=True)


@pytest.mark.parametrize("name", ["topk", "switch", "bias", "hash"])
def test_dispatch_modes_agree_when_nothing_is_dropped(name, device):
    seed_everything(fresh_seed())    # the layer's initial weights
    T = 37
    layer = MoELayer(D, F, _routers()[name], dispatch="einsum", init_std=0.2).to(device)
    x = _randn(T, D, device=device).requires_grad_()
    ids = torch.randint(0, 256, (T,), device=device)
    results = {}
    for dispatch, backend in [("einsum", "torch"), ("index", "torch"), ("sort", "torch"),
                              ("sort", "triton")]:
        layer.dispatch, layer.backend = dispatch, backend
        results[dispatch, backend] = _grads(layer, x, ids)
        assert layer.last_dropped == 0.0
    y0, g0 = results["einsum", "torch"]
    for key, (y, g) in results.items():   # the Triton backend's fp32 matmuls are TF32 on a GPU
        assert_close(y, y0, matmul=True, what=f"{key} output")
        for a, b in zip(g, g0, strict=True):
            if b is not None:
                assert_close(a, b, matmul=True, what=f"{key} gradient")


@pytest.mark.parametrize("name", ["topk", "switch", "bias"])
def test_gradients_reach_the_router(name, device):
    seed_everything(fresh_seed())
    layer = MoELayer(D, F, _routers()[name], init_std=0.2).to(device)
    layer(_randn(50, D, device=device)).square().sum().backward()
    assert layer.router.weight.grad is not None
    assert layer.router.weight.grad.abs().sum() > 0


def test_aux_loss_alone_trains_the_router_and_is_collected(device):
    layer = MoELayer(D, F, TopKRouter(D, E, 2, aux_weight=1.0))
    model = torch.nn.Sequential(layer, MoELayer(D, F, SwitchRouter(D, E, aux_weight=1.0)))
    model.to(device)(_randn(40, D, device=device))
    total = moe_aux_loss(model)
    assert total.item() == pytest.approx(sum(m.aux_loss.item() for m in model), rel=1e-6)
    assert total.item() >= 2 * 0.9        # each ≈ 1 or more, near-uniform at init
    total.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_capacity_drops_in_priority_order_and_dropped_tokens_contribute_nothing(device):
    seed_everything(fresh_seed())
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]], device=device)
    slot, keep = capacity_slots(idx, 3, cap=2)
    # First choices fill first: expert 0 takes tokens 0, 1 and is full for token 2; expert 1
    # takes token 3. Then second choices: expert 1 takes token 0 (slot 1) and is full for
    # token 2; expert 0 is full for token 3.
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert slot[:, 0].tolist() == [0, 1, 2, 0]
    layer = MoELayer(D, F, TopKRouter(D, E, 2), dispatch="einsum", capacity_factor=0.5,
                     init_std=0.2).to(device)
    x = _randn(30, D, device=device).requires_grad_()
    y, grads = _grads(layer, x, None)
    dropped = layer.last_dropped
    assert dropped > 0
    routing = layer.router(x)
    _, keep = capacity_slots(routing.indices, E, capacity(30, 2, E, 0.5))
    assert 1 - keep.float().mean().item() == pytest.approx(dropped)
    # Tutel's index dispatch and the sort dispatch apply the same rule (index: the same padded
    # slots filled by copy; sort: dropped rows sort past the groups and stay zero) ...
    for dispatch, backend in (("index", "torch"), ("sort", "torch"), ("sort", "triton")):
        layer.dispatch, layer.backend = dispatch, backend
        y2, grads2 = _grads(layer, x, None)
        assert layer.last_dropped == pytest.approx(dropped)
        assert_close(y2, y, matmul=True, what=f"{dispatch} ({backend}) with capacity")
        for a, b in zip(grads2, grads, strict=True):
            assert_close(a, b, matmul=True, what=f"{dispatch} ({backend}) gradient")
    # ... which is the dropless layer with the dropped assignments' gates set to zero.
    ref, _ = sort_dispatch(x, routing.gates * keep, routing.indices, layer.w_gate_up,
                           layer.w_down)
    assert_close(y, ref, matmul=True, what="capacity-limited output")


def test_hash_router_is_deterministic_and_ignores_the_hidden_state(device):
    ids = torch.randint(0, 256, (300,), device=device,
                        generator=torch.Generator(device=device).manual_seed(fresh_seed()))
    a = HashRouter(D, E).to(device)(_randn(300, D, device=device), ids).indices
    b = HashRouter(D, E).to(device)(_randn(300, D, device=device), ids.clone()).indices
    assert torch.equal(a, b)
    assert torch.equal(a[ids == ids[0]], a[ids == ids[0]][:1].expand(int((ids == ids[0]).sum()), 1))
    assert len(torch.unique(a)) == E, "256 ids over 6 experts should reach every expert"
    layer = MoELayer(D, F, HashRouter(D, E)).to(device)
    with pytest.raises(ValueError, match="token_ids are required"):
        layer(_randn(4, D, device=device))
    model = torch.nn.Sequential(layer)
    with token_ids(model, ids[:4].view(2, 2)):
        model(_randn(2, 2, D, device=device))
    assert layer.token_ids is None


def test_bias_router_balances_load_without_touching_gates(device):
    seed_everything(fresh_seed())
    router = BiasBalancedRouter(D, E, 2, gamma=0.05).to(device)
    with torch.no_grad():
        router.weight[0] += 3.0          # expert 0 is everyone's favourite
    x = _randn(400, D, device=device) + 1.0

    def imbalance():
        load = torch.bincount(router(x).indices.reshape(-1), minlength=E).float()
        return (load.max() / load.mean()).item()

    before = imbalance()
    gates_before = router(x).gates
    for _ in range(60):
        router(x)
        router.after_step()
    assert router.bias[0] < 0
    assert imbalance() < before - 0.5
    assert torch.all(router(x).gates > 0) and gates_before.shape == (400, 2)


def test_bad_input_is_rejected_with_a_clear_message(device):
    with pytest.raises(ValueError, match="k must be"):
        TopKRouter(D, 4, k=5)
    with pytest.raises(ValueError, match="k must be"):
        BiasBalancedRouter(D, 2, k=3)
    for cf in (0.0, -1.0):
        with pytest.raises(ValueError, match="capacity_factor must be > 0"):
            MoELayer(D, F, SwitchRouter(D, E), dispatch="einsum", capacity_factor=cf)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        MoELayer(D, F, SwitchRouter(D, E), dispatch="sort", capacity_factor=0.0)
    layer = MoELayer(D, F, TopKRouter(D, E, 2)).to(device)
    with pytest.raises(ValueError, match="last dimension 24"):
        layer(torch.randn(5, D + 1, device=device))
    with pytest.raises(ValueError, match="token_ids has 3 ids"):
        layer(torch.randn(5, D, device=device), torch.arange(3, device=device))
    with pytest.raises(ValueError, match="router.dim"):
        MoELayer(D + 1, F, TopKRouter(D, E, 2))
    with pytest.raises(ValueError, match="dispatch must be"):
        MoELayer(D, F, TopKRouter(D, E, 2), dispatch="scatter")
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        MoELayer(D, F, TopKRouter(D, E, 2), dispatch="index", capacity_factor=-0.5)


def test_mixtral_block_with_our_weights_gives_our_output(device):
    seed_everything(fresh_seed())
    layer = MoELayer(D, F, TopKRouter(D, 8, 2, renormalize=True), init_std=0.2).eval()
    block = mixtral_block(layer).to(device)
    layer.to(device)
    x = _randn(3, 11, D, device=device)
    with torch.no_grad():
        assert_close(layer(x), block(x), dtype=torch.float32, what="ours vs Mixtral")
    with pytest.raises(ValueError, match="renormalize"):
        mixtral_block(MoELayer(D, F, SwitchRouter(D, 8)))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_our_balancing_loss_is_transformers_divided_by_k(k, device):
    """HF's load_balancing_loss_func divides the counts by T, so Σ f_i = k and a uniform router
    scores k; ours divides by T·k (Switch eq. 4 read per assignment) and scores 1 for any k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator(device=device).manual_seed(fresh_seed())
    logits = torch.randn(77, 8, generator=g, device=device)
    route = topk_route(logits, k)
    ours = load_balancing_loss(route.probs, route.indices, 8)
    theirs = load_balancing_loss_func((logits,), 8, k)
    assert theirs.item() == pytest.approx(k * ours.item(), rel=1e-5)
