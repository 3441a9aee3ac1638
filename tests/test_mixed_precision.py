"""Mixed precision: our dynamic loss scaler against torch.amp.GradScaler on a run with natural
and planted overflows (same scales, same skipped steps, bit-identical fp32 masters), 16-bit
compute with fp32 masters tracking fp32 training, and the scaler's rule on its own."""

import pytest
import torch

from shared.bench import one_thread
from shared.models.llama import LlamaConfig
from shared.parallel.memory.mixed_precision import LossScaler, MixedPrecision, gradscaler_run
from shared.parallel.zero.model import ModelSpec, batch, build_model, loss_fn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """torch on one thread here: on a shared 2-core machine two OpenMP threads spin against
    each other (a 0.3 s step took 3-15 s); restored for the tests that follow."""
    with one_thread():
        yield


CFG = LlamaConfig(vocab_size=97, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40,
                  max_seq_len=16)
SPEC = ModelSpec(CFG, seq_len=11, seed=5)
PLANTED = (3, 4, 9)


def plant(step, model):
    if step in PLANTED:  # one inf in one 16-bit gradient: the whole step must be skipped
        model.layers[1].ffn.down_proj.weight.grad[0, 0] = float("inf")


def test_loss_scaling_matches_gradscaler():
    batches = [batch(SPEC, s, 4) for s in range(14)]
    # 2^20 overflows fp16 gradients on its own in the first steps: natural overflows too
    ours = MixedPrecision(build_model(SPEC), "fp16", lr=1e-2,
                          scaler=LossScaler(2.0**20, growth_interval=3), plant=plant)
    mine = [ours.step(loss_fn, *b) for b in batches]
    theirs, masters = gradscaler_run(build_model(SPEC), "fp16", batches, loss_fn, lr=1e-2,
                                     init_scale=2.0**20, growth_interval=3, plant=plant)
    assert mine == theirs
    skipped = [i for i, s in enumerate(mine) if s.skipped]
    assert set(PLANTED) <= set(skipped) and len(skipped) > len(PLANTED)  # natural ones too
    assert any(b.scale > a.scale for a, b in zip(mine, mine[1:], strict=False))  # grew
    for a, b in zip(ours.masters, masters, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16bit_compute_tracks_fp32(dtype):
    batches = [batch(SPEC, 0, 4)] * 8  # one batch, memorised: the loss has room to fall
    ref = MixedPrecision(build_model(SPEC), "fp32", lr=1e-2)
    ref_losses = [ref.step(loss_fn, *b).loss for b in batches]
    scaler = LossScaler(2.0**12, growth_interval=100) if dtype == "fp16" else None
    run = MixedPrecision(build_model(SPEC), dtype, lr=1e-2, scaler=scaler)
    steps = [run.step(loss_fn, *b) for b in batches]
    assert not any(s.skipped for s in steps)
    assert [s.loss for s in steps] == pytest.approx(ref_losses, rel=2e-2)
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it trains, so tracking it means something
    assert all(p.dtype != torch.float32 for p in run.params)
    assert all(m.dtype == torch.float32 for m in run.masters)


def test_scaler_rule():
    s = LossScaler(8.0, growth_interval=2)
    g = [torch.tensor([8.0, 16.0])]
    assert not s.unscale_(g) and torch.equal(g[0], torch.tensor([1.0, 2.0]))
    assert s.unscale_([torch.tensor([float("nan")])])
    s.update(True)
    assert (s.scale, s.clean_steps) == (4.0, 0)
    s.update(False)
    s.update(False)
    assert (s.scale, s.clean_steps) == (8.0, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="init_scale"):
        LossScaler(0.0)
    with pytest.raises(ValueError, match="growth_interval"):
        LossScaler(growth_interval=0)
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match="dtype"):
        MixedPrecision(build_model(SPEC), "fp8")
