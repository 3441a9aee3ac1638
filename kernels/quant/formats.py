"""Weight formats: int8, LLM.int8(), group-wise int4, NF4 with double quantization.

A weight w is an nn.Linear weight [N, K] (out × in). Every format stores it K-major, as the
transposed [K, N] that y = x @ Wᵀ reads column by column, the layout of GPTQ's `qweight`:
- "int8": absmax per output channel n, q = round(127 · w / max|w[n, :]|), data int8 [K, N],
  scale fp32 [N]. Weight-only (gpt-fast's int8).
- "llm.int8": the same int8 weight (vector-wise: one scale per row of W), and at matmul time
  the activations too are int8 per row, except the columns of x with a magnitude above
  `threshold` (6.0, LLM.int8() §3.2), which stay in 16 bits: the mixed-precision decomposition.
- "int4": asymmetric per group of `group_size` consecutive k (32, 64, 128), as GPTQ's
  quantizer: range [min(w, 0), max(w, 0)] over 15 steps, w ≈ scale · (q − zero), q ∈ [0, 15].
  Packed 8 per int32 along K: data int32 [K/8, N], bits 4i..4i+3 of word j hold k = 8j + i.
  scale fp16 and zero uint8, [K/G, N].
- "nf4": QLoRA's NormalFloat (§3, Appendix E): blockwise absmax over `group_size` = 64
  consecutive k, each w / absmax rounded to the nearest of the 16 NF4_CODE values, packed as
  int4. absmax fp32 [K/G, N] (0.5 bit per parameter), or with double quantization (§3, "Double
  Quantization"): absmax minus its mean, 8-bit per block of 256 absmax values (in bitsandbytes'
  row-major order of W's blocks: block b = n · K/G + g), so 8/64 + 32/(64 · 256) ≈ 0.127 bit.
  bitsandbytes quantizes the second level with its 8-bit dynamic map; we use linear int8
  (same bits, a slightly different error).

`QuantizedWeight.bits_per_param()` counts every stored byte, constants included.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from kernels.quant._args import check_format_args

FORMATS = ("int8", "llm.int8", "int4", "nf4")
DQ_BLOCK = 256          # absmax values per second-level block (QLoRA §3)
LLM_INT8_THRESHOLD = 6.0

# The 16 NF4 values (QLoRA Appendix E; bitsandbytes' `get_4bit_type("nf4")`): quantiles of
# N(0, 1), 8 on the positive side and 7 on the negative, from the offset 0.9677083, with an
# exact zero, normalised to [-1, 1]. tests/test_quant_formats.py rebuilds them from the normal
# quantile function and checks every bit.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_OFFSET = 0.9677083


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight. Tensor fields not used by a format are None."""

    fmt: str
    shape: tuple[int, int]           # (N, K) of the original weight
    dtype: torch.dtype               # the original float dtype (dequantize returns it)
    group_size: int | None
    data: torch.Tensor               # int8 [K, N] or packed int32 [K/8, N]
    scale: torch.Tensor              # int8: [N]; int4: [K/G, N] fp16; nf4: absmax or its int8
    zero: torch.Tensor | None = None         # int4: uint8 [K/G, N]
    dq_scale: torch.Tensor | None = None     # nf4 double quant: fp32 [ceil(K/G · N / 256)]
    dq_mean: torch.Tensor | None = None      # nf4 double quant: fp32 [1]
    threshold: float | None = None           # llm.int8: outlier magnitude of x

    @property
    def double_quant(self) -> bool:
        return self.dq_scale is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_param(self) -> float:
        """Stored bits per weight, every constant included."""
        n, k = self.shape
        return 8 * self.nbytes() / (n * k)

    def absmax(self) -> torch.Tensor:
        """nf4: the per-block absmax [K/G, N] in fp32 (undoing double quantization)."""
        if self.fmt != "nf4":
            raise ValueError(f"absmax() is for nf4 weights, this one is {self.fmt!r}")
        if not self.double_quant:
            return self.scale
        kg, n = self.scale.shape
        flat = self.scale.t().reshape(-1).float()                     # block b = n·K/G + g
        second = self.dq_scale.repeat_interleave(DQ_BLOCK)[: flat.numel()]
        return (flat * second + self.dq_mean).reshape(n, kg).t()

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] back in its original dtype."""
        return dequantize_t(self).t().to(self.dtype)


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N] -> codes int32 [K, N] in 0..15 (row k = 8j + i is nibble i of word j)."""
    shifts = 4 * torch.arange(8, dtype=torch.int32, device=data.device)
    codes = (data[:, None, :] >> shifts[None, :, None]) & 0xF           # [K/8, 8, N]
    return codes.reshape(-1, data.shape[1])


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [K, N] in 0..15 -> int32 [K/8, N] (inverse of unpack_int4)."""
    k, n = codes.shape
    c = codes.to(torch.int64).reshape(k // 8, 8, n)
    shifts = 4 * torch.arange(8, dtype=torch.int64, device=codes.device)
    word = (c << shifts[None, :, None]).sum(1)                            # < 2^32, as uint32
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def dequantize_t(qw: QuantizedWeight) -> torch.Tensor:
    """The transposed weight [K, N] in fp32 (what the matmul kernels rebuild tile by tile)."""
    n, k = qw.shape
    if qw.fmt in ("int8", "llm.int8"):
        return qw.data.float() * qw.scale.float()[None, :]
    codes = unpack_int4(qw.data)
    g = qw.group_size
    if qw.fmt == "int4":
        scale = qw.scale.float().repeat_interleave(g, 0)
        zero = qw.zero.float().repeat_interleave(g, 0)
        return (codes.float() - zero) * scale
    return NF4_CODE.to(qw.data.device)[codes] * qw.absmax().repeat_interleave(g, 0)


def int4_params(w_groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's asymmetric quantizer on [..., G] groups: (scale fp16, zero uint8), shapes [...].

    The range always includes 0; a constant group gets scale 1 (any scale represents it)."""
    lo = w_groups.amin(-1).clamp(max=0).float()
    hi = w_groups.amax(-1).clamp(min=0).float()
    scale = ((hi - lo) / 15).half()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / scale.float()).clamp(0, 15).to(torch.uint8)
    return scale, zero


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero, 0, 15), broadcasting scale and zero over w."""
    return (torch.round(w.float() / scale.float()) + zero.float()).clamp(0, 15).to(torch.int32)


def from_int4_codes(codes_nk: torch.Tensor, scale_ng: torch.Tensor, zero_ng: torch.Tensor,
                    dtype: torch.dtype, group_size: int) -> QuantizedWeight:
    """An "int4" QuantizedWeight from codes [N, K] and per-group scale, zero [N, K/G] (GPTQ's
    output goes through here, so RTN and GPTQ weights share one format)."""
    n, k = codes_nk.shape
    return QuantizedWeight("int4", (n, k), dtype, group_size, pack_int4(codes_nk.t()),
                           scale_ng.t().contiguous().half(), zero_ng.t().contiguous())


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(1).float() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _nf4(w: torch.Tensor, g: int, double_quant: bool, dtype) -> QuantizedWeight:
    n, k = w.shape
    blocks = w.float().reshape(n, k // g, g)
    absmax = blocks.abs().amax(-1)                                        # [N, K/G]
    normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    code = NF4_CODE.to(w.device)
    mids = (code[1:] + code[:-1]) / 2                                     # nearest code
    codes = torch.bucketize(normed, mids).to(torch.int32).reshape(n, k)
    data = pack_int4(codes.t())
    if not double_quant:
        return QuantizedWeight("nf4", (n, k), dtype, g, data, absmax.t().contiguous())
    flat = absmax.reshape(-1)                                             # block b = n·K/G + g
    mean = flat.mean().reshape(1)
    centred = flat - mean
    pad = -flat.numel() % DQ_BLOCK
    second = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, DQ_BLOCK)
    dq_scale = (second.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q8 = torch.round(second / dq_scale[:, None]).clamp(-127, 127).to(torch.int8)
    q8 = q8.reshape(-1)[: flat.numel()].reshape(n, k // g).t().contiguous()
    return QuantizedWeight("nf4", (n, k), dtype, g, data, q8, dq_scale=dq_scale, dq_mean=mean)


def quantize(w: torch.Tensor, fmt: str, *, group_size: int | None = None,
             double_quant: bool = True, threshold: float = LLM_INT8_THRESHOLD) -> QuantizedWeight:
    """Quantize an nn.Linear weight w [N, K] (fp32, fp16 or bf16) into `fmt` (module docstring).

    group_size: int4 32, 64 or 128 (default 128); nf4 its block (default 64); must divide K.
    double_quant: nf4 only, quantize the absmax constants (QLoRA). threshold: llm.int8 only.
    """
    g = check_format_args(w, fmt, group_size, FORMATS)
    n, k = w.shape
    if fmt in ("int8", "llm.int8"):
        q, scale = _int8_rows(w)
        return QuantizedWeight(fmt, (n, k), w.dtype, None, q.t().contiguous(), scale,
                               threshold=threshold if fmt == "llm.int8" else None)
    if fmt == "int4":
        scale, zero = int4_params(w.reshape(n, k // g, g))
        codes = int4_codes(w.reshape(n, k // g, g), scale[..., None], zero[..., None])
        return from_int4_codes(codes.reshape(n, k), scale, zero, w.dtype, g)
    return _nf4(w, g, double_quant, w.dtype)
