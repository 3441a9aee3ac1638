"""Quantizing the tiny Llama: every linear layer of its blocks in one format, by RTN or GPTQ.

The embedding and the lm_head stay in full precision (as GPTQ, AWQ and bitsandbytes leave
them). A quantized layer computes `quantized_matmul_reference` (dequantize, then matmul in fp32;
for LLM.int8 the int8 activations with their fp16 outliers): the same numbers the Triton and
Pallas kernels produce (tests/test_quant_matmul.py), at torch's speed, so a perplexity run over
the held-out text takes seconds instead of the interpreter's minutes.

- RTN: `quantize(w, fmt)` per layer.
- GPTQ: blocks in order; the inputs of block b's layers are recorded on the calibration text
  with blocks 0..b-1 already quantized (the reference code's sequential pass), then each layer is
  quantized from its own Hessian.
- `keep`: AWQ's observation (§2.1, Table 1): keeping 1% of the input channels in full precision
  helps a lot if they are the *salient* ones, chosen by activation magnitude on the calibration
  text, and little if chosen at random. Kept columns are restored after dequantizing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kernels.quant import QuantizedWeight, quantize, quantized_matmul_reference
from shared.models.llama import Llama
from shared.quant.gptq import gptq_quantize, hessian


class QuantLinear(nn.Module):
    """A bias-free nn.Linear replaced by its quantized weight (plus optional kept columns)."""

    def __init__(self, qw: QuantizedWeight, kept: torch.Tensor | None = None,
                 kept_w: torch.Tensor | None = None):
        super().__init__()
        self.qw = qw
        w = qw.dequantize().float()
        if kept is not None:
            w[:, kept] = kept_w.float()
        self.register_buffer("w_hat", w)
        self.kept = kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qw.fmt == "llm.int8":      # activations are quantized too: the real reference
            flat = x.reshape(-1, x.shape[-1])
            return quantized_matmul_reference(flat, self.qw).reshape(*x.shape[:-1], -1)
        return F.linear(x, self.w_hat)     # = dequantize-then-matmul, the reference


def block_linears(model: Llama) -> Iterator[tuple[int, str, nn.Module, str, nn.Linear]]:
    """(block index, dotted name, parent module, attribute, linear) for every block linear."""
    for b, block in enumerate(model.layers):
        for name, mod in block.named_modules():
            for attr, child in mod.named_children():
                if isinstance(child, nn.Linear | QuantLinear):
                    yield b, f"layers.{b}.{name}.{attr}".replace("..", "."), mod, attr, child


@torch.no_grad()
def record_inputs(model: Llama, tokens: torch.Tensor, block: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """The inputs [n, K] of every block linear (of one block if given) on tokens [B, T]."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for b, name, _, _, lin in block_linears(model):
        if block is None or b == block:
            hooks.append(lin.register_forward_hook(
                lambda m, inp, out, name=name: seen.setdefault(name, []).append(
                    inp[0].reshape(-1, inp[0].shape[-1]).detach())))
    try:
        model(tokens, n_layers=(block + 1) if block is not None else None)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def salient_channels(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """AWQ's salient input channels: the `fraction` with the largest mean |activation|."""
    count = max(1, round(fraction * x.shape[1]))
    return torch.topk(x.abs().mean(0), count).indices


@torch.no_grad()
def quantize_model(model: Llama, fmt: str, *, group_size: int | None = None,
                   method: str = "rtn", calib: torch.Tensor | None = None,
                   act_order: bool = False, double_quant: bool = True,
                   keep: str | None = None, keep_fraction: float = 0.01,
                   seed: int = 0) -> Llama:
    """A copy of `model` with every block linear quantized (module docstring).

    method "gptq" (int4 only) and keep "salient" need calibration tokens `calib` [B, T];
    keep is None, "salient" or "random" (a seeded random set of the same size)."""
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if method == "gptq" and fmt != "int4":
        raise ValueError(f"method='gptq' produces int4, got fmt={fmt!r}")
    if keep not in (None, "salient", "random"):
        raise ValueError(f"keep must be None, 'salient' or 'random', got {keep!r}")
    if (method == "gptq" or keep == "salient") and calib is None:
        raise ValueError("calib tokens [B, T] are needed for GPTQ and for salient channels")
    q = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for b in range(len(q.layers)):
        inputs = record_inputs(q, calib, b) if calib is not None else {}
        for blk, name, parent, attr, lin in list(block_linears(q)):
            if blk != b:
                continue
            w = lin.weight
            if method == "gptq":
                qw = gptq_quantize(w, hessian(inputs[name]), group_size=group_size or 128,
                                   act_order=act_order)
            else:
                extra = {"double_quant": double_quant} if fmt == "nf4" else {}
                qw = quantize(w, fmt, group_size=group_size, **extra)
            kept = None
            if keep == "salient":
                kept = salient_channels(inputs[name], keep_fraction)
            elif keep == "random":
                count = max(1, round(keep_fraction * w.shape[1]))
                kept = torch.randperm(w.shape[1], generator=gen)[:count]
            setattr(parent, attr, QuantLinear(qw, kept, w[:, kept] if kept is not None else None))
    return q


@torch.no_grad()
def perplexity(model: Llama, tokens: torch.Tensor, seq_len: int, windows: int) -> float:
    """exp(mean cross-entropy per byte) over the first `windows` non-overlapping windows of
    `tokens` (deterministic: every model is scored on the same bytes)."""
    need = windows * seq_len + 1
    if tokens.numel() < need:
        raise ValueError(f"tokens has {tokens.numel()} tokens, {windows} windows of {seq_len} "
                         f"need {need}")
    x = tokens[: windows * seq_len].reshape(windows, seq_len)
    y = tokens[1: windows * seq_len + 1].reshape(windows, seq_len)
    logits = model(x)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return float(torch.exp(nll))


def model_bits(model: Llama) -> tuple[float, int]:
    """(bits per parameter of the block linears, total bytes of the model as stored), counting
    the quantized layers' every byte and the rest (embedding, norms, lm_head) in fp16."""
    qbytes = qparams = 0
    other = 0
    for _, _, _, _, lin in block_linears(model):
        if isinstance(lin, QuantLinear):
            n, k = lin.qw.shape
            qbytes += lin.qw.nbytes() + (0 if lin.kept is None else 2 * n * lin.kept.numel())
            qparams += n * k
    linear_ids = {id(lin.weight) for *_, lin in block_linears(model) if isinstance(lin, nn.Linear)}
    for p in model.parameters():
        if id(p) in linear_ids:
            qbytes += 2 * p.numel()
            qparams += p.numel()
        else:
            other += 2 * p.numel()
    return 8 * qbytes / qparams, qbytes + other


@torch.no_grad()
def layer_output_error(model: Llama, quantized: Llama, inputs: dict[str, torch.Tensor]) -> float:
    """Σ ‖X Wᵀ − layer_q(X)‖² / Σ ‖X Wᵀ‖² over every block linear, X the full-precision model's
    own inputs to that layer (`record_inputs(model, tokens)`): GPTQ's objective, summed."""
    num = den = 0.0
    exact = {name: lin for _, name, _, _, lin in block_linears(model)}
    for _, name, _, _, lin in block_linears(quantized):
        x = inputs[name]
        want = F.linear(x, exact[name].weight)
        num += float(((lin(x) - want).double() ** 2).sum())
        den += float((want.double() ** 2).sum())
    return num / den
