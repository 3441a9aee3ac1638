"""Activation checkpointing: the same loss and gradients as no checkpointing (float64, odd
depths that split into uneven segments), and the saved-activation peak measured against
n, √n and the per-layer count of block inputs."""

import math

import pytest
import torch

from shared.benchmarks.zero import one_thread
from shared.models.llama import Llama, LlamaConfig
from shared.parallel.memory.checkpointing import llama_step, segment_size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """torch on one thread here: on a shared 2-core machine two OpenMP threads spin against
    each other (a 0.3 s step took 3-15 s); restored for the tests that follow."""
    with one_thread():
        yield


def _model(n, dtype=torch.float32, seed=0):
    cfg = LlamaConfig(vocab_size=61, dim=16, n_layers=n, n_heads=4, n_kv_heads=2, ffn_dim=40,
                      max_seq_len=64)
    torch.manual_seed(seed)
    return Llama(cfg).to(dtype)


def _step(model, tokens, schedule):
    model.zero_grad(set_to_none=True)
    loss, saved = llama_step(model, tokens, schedule)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss, grads, saved


@pytest.mark.parametrize("n", [1, 5, 7])
@pytest.mark.parametrize("schedule", ["per-layer", "sqrt"])
def test_same_loss_and_gradients(n, schedule):
    model = _model(n, torch.float64, seed=n)
    tokens = torch.randint(0, 61, (3, 38), generator=torch.Generator().manual_seed(n))
    ref_loss, ref_grads, _ = _step(model, tokens, "none")
    loss, grads, saved = _step(model, tokens, schedule)  # grads start from None: all fresh
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-10, atol=1e-12), name
    assert saved.live == 0  # everything saved was released by the end of the backward


def test_peak_memory_scales_as_n_and_sqrt_n():
    nds = [4, 9, 16]
    tokens = torch.randint(0, 61, (2, 65), generator=torch.Generator().manual_seed(0))
    peaks = {s: [_step(_model(n), tokens, s)[2].peak for n in nds] for s in
             ("none", "per-layer", "sqrt")}
    slope = lambda ys: math.log(ys[-1] / ys[0]) / math.log(nds[-1] / nds[0])
    assert slope(peaks["none"]) == pytest.approx(1.0, abs=0.1)
    assert slope(peaks["sqrt"]) == pytest.approx(0.5, abs=0.1)
    # per layer: each extra layer keeps exactly one more block input, B*T*D fp32 bytes
    per_layer = [(b - a) / (m - k) for a, b, k, m in
                 zip(peaks["per-layer"], peaks["per-layer"][1:], nds, nds[1:], strict=False)]
    assert per_layer == pytest.approx([2 * 64 * 16 * 4] * 2, rel=1e-9)
    assert all(c < p for c, p in zip(peaks["sqrt"], peaks["none"], strict=True))


def test_segment_sizes_and_bad_arguments():
    assert [segment_size(n, "sqrt") for n in (1, 4, 5, 16, 17)] == [1, 2, 3, 4, 5]
    assert segment_size(7, "per-layer") == 1 and segment_size(7, "none") == 7
    with pytest.raises(ValueError, match="schedule"):
        segment_size(4, "log")
    with pytest.raises(ValueError, match="n must"):
        segment_size(0, "sqrt")
