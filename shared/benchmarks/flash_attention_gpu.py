"""FlashAttention on a GPU: what our kernels should reach, and what they do beside torch SDPA.

- `predicted_tflops`: forward and backward TFLOP/s predicted from counted work with the configs
  a GPU generation gets (kernels/attention/configs.py): each kernel's tile pairs × tl.dot FLOPs
  at the MMA peak, plus one exp2 per computed score on the MUFU; printed by the CPU run for the
  H100 SXM and the H200 (`predicted_table`) and set beside every measured GPU row.
- `gpu_table` (a CUDA machine): FA2's benchmark shapes, ours and SDPA timed interleaved round by
  round in one process (bench.compare), our speed over SDPA's with a bootstrap 95% interval.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.attention import BlockSizes, flash_attention
from kernels.attention._args import padded_head_dim
from kernels.attention.configs import default_blocks, for_capability
from shared import bench, roofline
from shared.benchmarks import gpu_hardware, out_of_time, pct_of_roofline, record
from shared.benchmarks.flash_attention import cached_io_model, compulsory, model_flops
from shared.benchmarks.flash_attention_compiled import CLOCK_HZ, MUFU_PER_CLOCK_PER_SM

PASSES = ("forward", "dkdv", "dq")
# tl.dot FLOPs per score of each kernel, over 2·head_dim: forward S and PV; dK/dV S, dV, dP, dK;
# dQ S, dP, dQ. Each kernel also takes one exp2 per score it computes.
DOTS = {"forward": 2, "dkdv": 4, "dq": 3}


def tile_pairs(n: int, block_m: int, block_n: int, causal: bool, owner: str) -> int:
    """(query block, key block) pairs one head's kernel computes, seq_q = seq_k = n. owner
    "query" (forward, dQ): each query block walks the key blocks up to its diagonal; "key"
    (dK/dV): each key block walks the query blocks from its diagonal on."""
    if owner == "query":
        return sum(-(-(min(n, m + block_m) if causal else n) // block_n)
                   for m in range(0, n, block_m))
    if owner == "key":
        return sum(-(-(n - (s // block_m * block_m if causal else 0)) // block_m)
                   for s in range(0, n, block_n))
    raise ValueError(f"owner must be 'query' or 'key', got {owner!r}")


def predicted_tflops(hw: str, n: int, d: int, causal: bool,
                     blocks: dict[str, BlockSizes]) -> dict[str, float]:
    """Forward and backward TFLOP/s (conventional FLOPs, `model_flops`) predicted from counted
    work on `hw` in 16 bits: the tl.dot FLOPs and exp2s of the tile pairs each kernel computes
    (whole tiles, padding and the causal diagonal included) at the datasheet MMA rate and the
    MUFU's 16 exp2/clock/SM, and the perfect-cache bytes (`cached_io_model`: K/V re-reads hit
    L2, as the H200 run showed; without a cache the forward would be memory bound at d = 128,
    below what SDPA measured) at the datasheet bandwidth.

    "serial": MMAs and exps one after the other (FA2's schedule within a warp; the figure to
    expect); "overlapped": the larger of the two (the roofline; needs FA3's ping-pong). Left out:
    the FMA-unit work per score (scale, max, sums, conversions, the rescale), index arithmetic
    and launch gaps, so a measurement lands below "serial"."""
    part = roofline.hardware(hw)
    exp_rate = MUFU_PER_CLOCK_PER_SM * part.sms * CLOCK_HZ[hw]
    dp = padded_head_dim(d)
    conventional = dict(zip(("fwd", "bwd"), model_flops(1, 1, n, d, causal), strict=True))
    out = {}
    for name, passes in (("fwd", ("forward",)), ("bwd", ("dkdv", "dq"))):
        mma = exps = 0.0
        for p in passes:
            b = blocks[p]
            scores = tile_pairs(n, b.block_m, b.block_n, causal,
                                "key" if p == "dkdv" else "query") * b.block_m * b.block_n
            mma += 2 * DOTS[p] * dp * scores / part.peak("fp16")
            exps += scores / exp_rate
        io = cached_io_model("flash", n, d, blocks["forward"])
        mem = (io.fwd_bytes if name == "fwd" else io.bwd_bytes) / part.mem_bw
        out[f"{name} serial"] = conventional[name] / max(mma + exps, mem) / 1e12
        out[f"{name} overlapped"] = conventional[name] / max(mma, exps, mem) / 1e12
    return out


def _tiles_label(blocks: dict[str, BlockSizes]) -> str:
    return " ".join(f"{p} {b.block_m}x{b.block_n}w{b.num_warps}s{b.num_stages}"
                    for p, b in blocks.items())


def predicted_table(hw: str, cap: int = 90, ns=(1024, 4096, 16384), dims=(64, 128)) -> list[dict]:
    """`predicted_tflops` at the GPU table's shapes with the configs capability `cap` gets."""
    rows = []
    for d in dims:
        blocks = {p: for_capability(cap, p, d, 2) for p in PASSES}
        for causal in (False, True):
            for n in ns:
                pred = predicted_tflops(hw, n, d, causal, blocks)
                rows.append(record(
                    f"predicted TFLOP/s, fp16, sm_{cap} configs (counted MMA + exp work)",
                    {"hardware": hw, "d": d, "causal": causal, "n": n,
                     "tiles": _tiles_label(blocks), **{f"{k} predicted": v
                                                       for k, v in pred.items()}}))
    return rows


def gpu_table(ns=(1024, 4096, 16384), dims=(64, 128), dtype=torch.float16,
              repeat: int = 15) -> list[dict]:
    """FA2's benchmark setting on a CUDA GPU: batch·N = 16k tokens, heads·d = 2048; forward and
    backward TFLOP/s (conventional FLOPs) of ours and of torch SDPA (its flash backend, the fast
    path), each with its % of the roofline at compulsory traffic; our speed over SDPA's with a
    bootstrap 95% interval over paired rounds; the predicted TFLOP/s of our configs beside.
    Stops at the deadline."""
    rows = []
    for d in dims:
        for causal in (False, True):
            for n in ns:
                if out_of_time(reserve_s=8):
                    return rows
                rows.append(record("attention TFLOP/s (CUDA events, interleaved with SDPA)",
                                   _gpu_row(n, d, causal, dtype, repeat)))
    return rows


def _gpu_row(n: int, d: int, causal: bool, dtype, repeat: int, tokens: int = 16384,
             hidden: int = 2048, device: str = "cuda") -> dict:
    """One row of `gpu_table` (tokens, hidden and device are there for a small test on a CPU)."""
    import torch.nn.functional as F

    b, h = max(1, tokens // n), hidden // d
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    fwd_flops, bwd_flops = model_flops(b, h, n, d, causal)
    floor = compulsory(n, d, q.element_size()).scaled(b * h)
    hw, dt = gpu_hardware(), "bf16" if dtype == torch.bfloat16 else "fp16"
    blocks = {p: default_blocks(p, d, q.element_size()) for p in PASSES}
    row = {"d": d, "causal": causal, "n": n, "batch": b, "heads": h, "dtype": dt, "hardware": hw,
           "tiles": _tiles_label(blocks)}
    # n_q = n_k, so SDPA's top-left causal mask is our bottom-right one
    impls = {"ours": lambda: flash_attention(q, k, v, causal=causal),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    fns = {}
    for name, f in impls.items():
        fns[f"{name} fwd"] = f
        fns[f"{name} fwd+bwd"] = lambda f=f: f().backward(do)
    t = bench.compare(fns, warmup=3, repeat=repeat)      # round by round: drift hits all alike
    bwd = {name: [max(both - fwd, 1e-9) for fwd, both in
                  zip(t[f"{name} fwd"].samples, t[f"{name} fwd+bwd"].samples, strict=True)]
           for name in impls}
    for name in impls:
        fwd_s, bwd_s = t[f"{name} fwd"].median_s, float(np.median(bwd[name]))
        row[f"{name} fwd TFLOP/s"] = fwd_flops / fwd_s / 1e12
        row[f"{name} bwd TFLOP/s"] = bwd_flops / bwd_s / 1e12
        row[f"{name} fwd % roofline"] = pct_of_roofline(fwd_s, fwd_flops, floor.fwd_bytes, hw, dt)
        row[f"{name} bwd % roofline"] = pct_of_roofline(bwd_s, bwd_flops, floor.bwd_bytes, hw, dt)
    for pass_, r in (("fwd", bench.ratio(t["sdpa fwd"], t["ours fwd"])),
                     ("bwd", bench.ratio(bwd["sdpa"], bwd["ours"]))):
        row[f"ours/sdpa {pass_} speed"] = r.median
        row[f"{pass_} interval"] = f"[{r.low:.3g}, {r.high:.3g}]"
    if hw in CLOCK_HZ:
        for key, value in predicted_tflops(hw, n, d, causal, blocks).items():
            row[f"ours {key} predicted TFLOP/s"] = value
    return row
