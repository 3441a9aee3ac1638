"""shared/quant: GPTQ against RTN, and the tiny Llama quantized layer by layer."""

import pytest
import torch

from kernels.quant import quantize, quantized_matmul, quantized_matmul_reference
from shared.check import assert_close, fresh_seed
from shared.models.llama import Llama, LlamaConfig
from shared.quant.gptq import gptq_quantize, hessian
from shared.quant.model import (
    QuantLinear,
    layer_output_error,
    model_bits,
    perplexity,
    quantize_model,
    record_inputs,
)


def _layer(seed, n=48, k=128, tokens=512):
    """A weight and correlated inputs (x = z A: features share directions, as real ones do)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, k, generator=g)
    x += 0.1 * torch.randn(tokens, k, generator=g)
    return w, x


def _output_error(x, w, qw):
    return ((x.double() @ (w.double() - qw.dequantize().double()).t()) ** 2).sum().item()


def test_identity_hessian_is_rtn():
    # With H ∝ I the inverse Hessian is diagonal: no error is passed on, so GPTQ rounds every
    # weight to nearest, exactly as RTN (a wrong update or group order breaks this).
    g = torch.Generator().manual_seed(fresh_seed())
    w = torch.randn(20, 256, generator=g)
    for group in (32, 128):
        ours = gptq_quantize(w, torch.eye(256, dtype=torch.float64), group_size=group)
        rtn = quantize(w, "int4", group_size=group)
        assert torch.equal(ours.data, rtn.data) and torch.equal(ours.scale, rtn.scale)


@pytest.mark.parametrize("group,act_order", [(32, False), (128, False), (64, True)])
def test_gptq_beats_rtn_on_correlated_inputs(group, act_order):
    w, x = _layer(fresh_seed())
    h = hessian(x)
    gptq = gptq_quantize(w, h, group_size=group, act_order=act_order)
    rtn = quantize(w, "int4", group_size=group)
    # GPTQ's objective, ‖XWᵀ − XQᵀ‖² on the calibration inputs: same bits, far less error
    assert _output_error(x, w, gptq) < 0.7 * _output_error(x, w, rtn)
    assert gptq.fmt == "int4" and gptq.bits_per_param() == rtn.bits_per_param()


def test_gptq_weight_runs_in_the_kernel():
    w, x = _layer(fresh_seed(), n=37, k=128)
    qw = gptq_quantize(w, hessian(x), group_size=64, act_order=True)
    xs = x[:5].contiguous()
    assert_close(quantized_matmul(xs, qw), quantized_matmul_reference(xs.double(), qw),
                 matmul=True)


def test_dead_features_and_bad_arguments():
    w, x = _layer(fresh_seed())
    x[:, 3] = 0                                     # a feature that is never active
    assert torch.isfinite(gptq_quantize(w, hessian(x)).dequantize()).all()
    with pytest.raises(ValueError, match=r"h must be the \[K, K\] = \[128, 128\]"):
        gptq_quantize(w, torch.eye(64))
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        gptq_quantize(w, hessian(x), group_size=48)
    with pytest.raises(ValueError, match="x must be a tensor"):
        hessian(torch.ones(5))


def test_quantize_model_replaces_block_linears():
    torch.manual_seed(fresh_seed())
    cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128,
                      max_seq_len=64)
    model = Llama(cfg).eval()
    calib = torch.randint(0, 256, (2, 32))
    text = torch.randint(0, 256, (4 * 32 + 1,))
    for fmt, kw in (("nf4", {}), ("llm.int8", {}),
                    ("int4", dict(group_size=32, method="gptq", calib=calib)),
                    ("int4", dict(group_size=64, keep="salient", calib=calib))):
        q = quantize_model(model, fmt, **kw)
        layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
        assert len(layers) == 2 * 7 and all(m.qw.fmt == fmt for m in layers)
        ppl = perplexity(q, text, 32, 4)
        assert 1 < ppl < 1000
    bits, _ = model_bits(quantize_model(model, "int8"))
    assert 8 + 32 / 128 <= bits <= 8 + 32 / 64      # one fp32 scale per row, K = 64 or 128
    with pytest.raises(ValueError, match="method='gptq' produces int4"):
        quantize_model(model, "nf4", method="gptq", calib=calib)


def test_layer_output_error_orders_formats():
    torch.manual_seed(fresh_seed())
    cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128,
                      max_seq_len=64)
    model = Llama(cfg).eval()
    inputs = record_inputs(model, torch.randint(0, 256, (2, 32)))
    assert len(inputs) == 14 and all(x.shape[0] == 64 for x in inputs.values())
    assert layer_output_error(model, model, inputs) == 0.0
    errs = [layer_output_error(model, quantize_model(model, fmt, group_size=g), inputs)
            for fmt, g in (("int8", None), ("int4", 32), ("int4", 64))]
    assert 0 < errs[0] < errs[1] < errs[2] < 0.1
