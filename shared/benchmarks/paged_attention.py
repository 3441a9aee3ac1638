"""PagedAttention + Flash-Decoding: the measurements behind the lab, and `kclub bench
paged-attention`.

- KV memory utilisation (vLLM §3, Fig. 2): request lengths drawn from distributions shaped like
  the paper's workloads (Fig. 11 means), run through the real BlockManager step by step, against
  contiguous reservation (max length, power of two, oracle).
- Split-K (Flash-Decoding): programs and bytes counted in Triton's interpreter against an exact
  IO model, and an H100 latency prediction against the number of splits.
- GQA packing: stage-1 bytes per query head, packed (the kernel) and unpacked (the same kernel on
  a cache whose KV heads are repeated per query head).
- Roofline predictions of decode attention on named hardware.
Everything here counts or predicts; on a CUDA machine `main` also times the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kernels.device import INTERPRET, gpu_available
from kernels.paged import paged_attention
from kernels.paged.paged_attention_triton import default_splits
from kernels.paged.reference import random_paged_inputs
from shared import bench, iocount, roofline
from shared.benchmarks import out_of_time, record
from shared.inference.block_manager import BlockManager

# vLLM Fig. 11: mean input / output tokens of the two traces (ShareGPT 8.4x longer inputs and
# 5.8x longer outputs than Alpaca, §6.1); OPT's 2048-token context caps a request.
WORKLOADS = {"ShareGPT-like": (161.31, 337.99), "Alpaca-like": (19.31, 58.45)}
MAX_LEN = 2048
# Lognormal spreads: chosen by eye to give Fig. 11's long right tails; the means are the paper's.
SIGMA = {"ShareGPT-like": (1.0, 0.8), "Alpaca-like": (0.6, 0.8)}


def request_lengths(workload: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, output) token counts of n requests, lognormal with the paper's means, each
    request capped at MAX_LEN tokens in all (the output is cut first)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    out = []
    for mean, sigma in zip(WORKLOADS[workload], SIGMA[workload], strict=True):
        mu = math.log(mean) - sigma**2 / 2          # E[lognormal] = exp(mu + sigma²/2) = mean
        out.append(np.maximum(1, np.rint(rng.lognormal(mu, sigma, n))).astype(int))
    prompt = np.minimum(out[0], MAX_LEN - 1)
    return prompt, np.minimum(out[1], MAX_LEN - prompt)


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class Utilisation:
    scheme: str
    used: int              # token-steps holding real tokens, summed over every decode step
    reserved: int          # slot-steps reserved
    max_waste: int         # worst reserved − used of one sequence at one step (slots)

    @property
    def share(self) -> float:
        return self.used / self.reserved


def utilisation(prompt, output, block_sizes=(8, 16, 32)) -> list[Utilisation]:
    """Share of reserved KV slots that hold real tokens, averaged over every decode step of every
    request (all running at once). Contiguous schemes reserve at admission: MAX_LEN (Orca Max),
    the next power of two of the final length (Orca Pow2), the final length (Orca Oracle). Paged
    schemes run the real BlockManager: allocate the prompt, append one token per step."""
    final = [int(p + o) for p, o in zip(prompt, output, strict=True)]
    used = sum(sum(range(int(p) + 1, f + 1)) for p, f in zip(prompt, final, strict=True))
    steps = [int(o) for o in output]
    rows = []
    for name, reserve in (("contiguous, max length", lambda f: MAX_LEN),
                          ("contiguous, power of 2", _next_pow2),
                          ("contiguous, oracle", lambda f: f)):
        per_seq = [reserve(f) for f in final]
        waste = max(r - int(p) - 1 for r, p in zip(per_seq, prompt, strict=True))
        rows.append(Utilisation(name, used, sum(r * s for r, s in zip(per_seq, steps,
                                                                       strict=True)), waste))
    for bs in block_sizes:
        rows.append(_paged(prompt, output, bs))
    return rows


def _paged(prompt, output, block_size: int) -> Utilisation:
    mgr = BlockManager(sum(-(-int(p + o) // block_size) for p, o in zip(prompt, output,
                                                                        strict=True)), block_size)
    used = reserved = waste = 0
    for rid, (p, o) in enumerate(zip(prompt, output, strict=True)):
        # distinct token ids per request: no prefix-cache sharing inflates the share
        tokens = [rid * MAX_LEN + i for i in range(int(p))]
        if not mgr.allocate(rid, tokens).ok:
            raise RuntimeError(f"block pool too small for request {rid}")
        for t in range(int(o)):
            if not mgr.append_token(rid, rid * MAX_LEN + int(p) + t).ok:
                raise RuntimeError(f"block pool too small for request {rid}")
            n, slots = mgr.length(rid), len(mgr.block_table(rid)) * block_size
            used, reserved, waste = used + n, reserved + slots, max(waste, slots - n)
    mgr.check()
    return Utilisation(f"paged, block {block_size}", used, reserved, waste)


# ---- split-K and GQA: counted ---------------------------------------------------------------
def counted(ctx: int, heads: int, kv_heads: int, head_dim: int, splits: int,
            dtype=torch.float16, repeat_kv: bool = False) -> dict:
    """One decode step of one sequence of `ctx` tokens, counted in Triton's interpreter, per
    kernel. repeat_kv: the same step with every KV head copied once per query head (MHA layout),
    which is what a kernel that does not pack a group loads."""
    q, k, v, tables, lens = random_paged_inputs([ctx], heads, kv_heads, head_dim, dtype,
                                                pool=-(-ctx // 16) + 4)
    if repeat_kv:
        k, v = (x.repeat_interleave(heads // kv_heads, dim=2) for x in (k, v))
    with iocount.count() as c:
        paged_attention(q, k, v, tables, lens, num_splits=splits)
    split, merge = (c.by_kernel[n] for n in ("paged_attention_split_kernel",
                                              "paged_attention_merge_kernel"))
    return {"ctx": ctx, "heads": heads, "kv_heads": kv_heads * (heads // kv_heads if repeat_kv
                                                                else 1),
            "head_dim": head_dim, "splits": splits, "element_size": q.element_size(),
            "split_programs": split.programs, "merge_programs": merge.programs,
            "split_loaded": split.bytes_loaded, "split_stored": split.bytes_stored,
            "merge_loaded": merge.bytes_loaded, "merge_stored": merge.bytes_stored,
            "dot_flops": c.dot_flops, "bytes": c.bytes_total}


def io_model(ctx: int, heads: int, kv_heads: int, head_dim: int, splits: int, batch: int = 1,
             element_size: int = 2) -> dict:
    """The bytes split-K paged attention must move, written out: K and V once (2·L·Hkv·D),
    one block-table entry per token per KV head, q once per split, the fp32 partials (acc, m, l)
    written by stage 1 and read by stage 2, and the output."""
    e = element_size
    partials = batch * heads * splits * (head_dim + 2) * 4
    split_loaded = batch * (2 * ctx * kv_heads * head_dim * e + ctx * kv_heads * 4
                            + splits * heads * head_dim * e + splits * kv_heads * 4)
    return {"split_programs": batch * kv_heads * splits, "merge_programs": batch * heads,
            "split_loaded": split_loaded, "split_stored": partials, "merge_loaded": partials,
            "merge_stored": batch * heads * head_dim * e,
            "kv_bytes": batch * 2 * ctx * kv_heads * head_dim * e,
            "bytes": split_loaded + 2 * partials + batch * heads * head_dim * e}


# ---- predictions ----------------------------------------------------------------------------
LAUNCH_S = 2.5e-6   # assumed fixed cost per kernel launch on a GPU (order of magnitude only)


def predict_latency(ctx: int, heads: int, kv_heads: int, head_dim: int, splits: int,
                    hw: str = "H100 SXM", *, batch: int = 1, element_size: int = 2,
                    warps: int = 4, stages: int = 2, block_n: int = 64,
                    max_occupancy: float = 1.0) -> dict:
    """A prediction of one decode attention call: the IO model's bytes at the bandwidth the
    resident programs can pull. Each stage-1 program keeps `stages` K+V tiles in flight
    (Little's law, roofline.occupancy_bandwidth); with B·Hkv·S programs on 132 SMs, few programs
    cannot saturate HBM however fast each is. Plus LAUNCH_S per kernel."""
    part = roofline.hardware(hw)
    io = io_model(ctx, heads, kv_heads, head_dim, splits, batch, element_size)
    in_flight = stages * 2 * block_n * head_dim * element_size / warps   # per warp
    occ = min(max_occupancy, io["split_programs"] * warps / (part.max_warps_per_sm * part.sms))
    bw = roofline.occupancy_bandwidth(part, occ, in_flight)
    stage1 = (io["split_loaded"] + io["split_stored"]) / bw
    stage2 = (io["merge_loaded"] + io["merge_stored"]) / part.mem_bw
    busy = min(part.sms, io["split_programs"])
    return {"splits": splits, "programs": io["split_programs"], "sms_busy": busy,
            "bandwidth": bw, "time_s": stage1 + stage2 + 2 * LAUNCH_S, "bytes": io["bytes"]}


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int,
                   element_size: int = 2) -> int:
    """K and V of every layer for `tokens` tokens."""
    return 2 * layers * kv_heads * head_dim * element_size * tokens


def decode_roofline(hw: str, batch: int, ctx: int, heads: int, kv_heads: int, head_dim: int,
                    layers: int, dtype: str = "bf16") -> roofline.Prediction:
    """Roofline of the attention of one decode step (all layers): FLOPs 4·L·Hq·D per sequence
    and layer (q·K and p·V), bytes from io_model at the default split count."""
    s = default_splits(batch, kv_heads, ctx, sms=roofline.hardware(hw).sms or 132)
    io = io_model(ctx, heads, kv_heads, head_dim, s, batch)
    return roofline.predict(layers * batch * 4 * ctx * heads * head_dim, layers * io["bytes"],
                            hw, dtype)


def main() -> int:
    prompt, output = request_lengths("ShareGPT-like", 200)
    for u in utilisation(prompt, output):
        record("KV utilisation, ShareGPT-like, 200 requests", {"scheme": u.scheme,
               "share": u.share, "max waste slots": u.max_waste})
    if INTERPRET:
        for s in (1, 4, 16):
            c = counted(2048, 32, 8, 128, s)
            record("split-K counted (Triton interpreter), 2048 tokens, 32/8 heads, d=128",
                   {k: c[k] for k in ("splits", "split_programs", "bytes")})
    for s in (1, 2, 4, 8, 16, 32, 64):
        p = predict_latency(32768, 32, 8, 128, s)
        record("predicted H100 decode attention, batch 1, 32k tokens (prediction)",
               {"splits": s, "µs": p["time_s"] * 1e6, "SMs busy": p["sms_busy"]})
    if gpu_available() and not INTERPRET:
        for ctx in (4096, 32768):
            if out_of_time(reserve_s=5):
                break
            args = random_paged_inputs([ctx], 32, 8, 128, torch.float16, pool=ctx // 16 + 4,
                                       device="cuda")
            for s in (1, None):
                tm = bench.measure(lambda s=s, a=args: paged_attention(*a, num_splits=s,
                                                                        check_inputs=False))
                record("paged_attention, CUDA, batch 1, 32/8 heads, d=128, fp16",
                       {"ctx": ctx, "splits": s or "default", "µs": tm.median_s * 1e6})
    return 0
