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
from kernels.paged import paged_attention, paged_attention_reference
from kernels.paged.paged_attention_triton import PROGRAMS_PER_SM, default_splits
from kernels.paged.reference import random_paged_inputs
from shared import bench, iocount, roofline
from shared.benchmarks import gpu_hardware, out_of_time, record
from shared.check import assert_close
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
    kernel (one split has no merge kernel: its zeros are counted). repeat_kv: the same step with
    every KV head copied once per query head (MHA layout), which is what a kernel that does not
    pack a group loads."""
    q, k, v, tables, lens = random_paged_inputs([ctx], heads, kv_heads, head_dim, dtype,
                                                pool=-(-ctx // 16) + 4)
    if repeat_kv:
        k, v = (x.repeat_interleave(heads // kv_heads, dim=2) for x in (k, v))
    with iocount.count() as c:
        paged_attention(q, k, v, tables, lens, num_splits=splits)
    split, merge = (c.by_kernel.get(n, iocount.Traffic()) for n in
                    ("paged_attention_split_kernel", "paged_attention_merge_kernel"))
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
    one block-table entry per token per KV head, q once per split, seq_len once per program,
    the fp32 partials (acc, m, l) written by stage 1 and read by stage 2, and the output. One
    split has no partials and no stage 2: stage 1 writes the output."""
    e = element_size
    out = batch * heads * head_dim * e
    partials = batch * heads * splits * (head_dim + 2) * 4 if splits > 1 else 0
    split_loaded = batch * (2 * ctx * kv_heads * head_dim * e + ctx * kv_heads * 4
                            + splits * heads * head_dim * e + splits * kv_heads * 4)
    return {"split_programs": batch * kv_heads * splits,
            "merge_programs": batch * heads if splits > 1 else 0,
            "split_loaded": split_loaded, "split_stored": partials or out,
            "merge_loaded": partials, "merge_stored": out if splits > 1 else 0,
            "kv_bytes": batch * 2 * ctx * kv_heads * head_dim * e,
            "bytes": split_loaded + 2 * partials + out}


# ---- predictions ----------------------------------------------------------------------------
LAUNCH_S = 2.5e-6   # assumed fixed cost per kernel launch on a GPU (order of magnitude only)
# What one stage-1 tile (64 tokens: a 32 KB K+V tile in fp16 at d = 128) costs a program, from
# the first H200 run (docs/gpu-runs/2026-11-27-h200): the loop then waited for the tile's table
# entries, then for its K/V, then computed, one after another; at 1 split, 32k tokens, each of
# the 8 programs ran 512 tiles in 972.4 µs, 1.90 µs a tile = 2 memory latencies (the roofline's
# 500 ns) + 0.90 µs of work for its 561 SASS instructions per warp. The loop now issues the
# next tile's loads first, so a tile costs the larger of one latency and its work: 619
# instructions, scaled by that rate. Both counts: the sm_90 SASS from Triton 3.6 (the H200's),
# cuobjdump -sass, the loop from its label to its backward branch. Re-count them when the
# kernel changes.
OLD_TILE_S = 972.4e-6 / 512
LOOP_INSTRUCTIONS = {"before": 561, "now": 619}


def tile_work_s(hw: str) -> float:
    """Seconds of one stage-1 tile's work (not its waits), from OLD_TILE_S as above."""
    latency = roofline.hardware(hw).mem_latency_s
    per_instruction = (OLD_TILE_S - 2 * latency) / LOOP_INSTRUCTIONS["before"]
    return per_instruction * LOOP_INSTRUCTIONS["now"]


def predict_latency(ctx: int, heads: int, kv_heads: int, head_dim: int, splits: int,
                    hw: str = "H100 SXM", *, batch: int = 1, element_size: int = 2) -> dict:
    """A prediction of one decode attention call on `hw` (fp16, d ≤ 128: 64-token tiles).

    Stage 1 takes the longer of two floors: the IO model's bytes at HBM bandwidth, and its
    programs' own time, PROGRAMS_PER_SM resident per SM, in waves: a program pays two memory
    latencies before its first tile (the table, then K/V), then max(latency, tile work) per
    tile (the next tile's loads are in flight while one is computed). Stage 2 is its bytes at
    bandwidth plus one latency; LAUNCH_S per kernel."""
    part = roofline.hardware(hw)
    io = io_model(ctx, heads, kv_heads, head_dim, splits, batch, element_size)
    latency, work = part.mem_latency_s, tile_work_s(hw)
    programs = io["split_programs"]
    waves = -(-programs // (PROGRAMS_PER_SM * part.sms))
    tiles = math.ceil(math.ceil(ctx / splits) / 64)   # the kernel's chunk, in tiles
    per_program = 2 * latency + tiles * max(latency, work)
    dram = (io["split_loaded"] + io["split_stored"]) / part.mem_bw
    stage1 = max(dram, waves * per_program)
    stage2 = (io["merge_loaded"] + io["merge_stored"]) / part.mem_bw + latency if splits > 1 \
        else 0.0
    launches = 2 if splits > 1 else 1
    return {"splits": splits, "programs": programs, "sms_busy": min(part.sms, programs),
            "bound": "HBM" if dram >= waves * per_program else "latency",
            "bandwidth": io["bytes"] / (stage1 + stage2),
            "time_s": stage1 + stage2 + launches * LAUNCH_S, "bytes": io["bytes"]}


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


# The GPU rows: (batch, context, split counts to time; None is the launcher's default). The
# first H200 run's shapes, its old default (17 splits at 32k on 132 SMs) and a batch of 16;
# the headline first, as the deadline may stop the loop.
GPU_CASES = ((1, 32768, (1, 17, None)), (1, 4096, (1, None)), (16, 4096, (1, None)))


def gpu_table(cases=GPU_CASES, repeat: int = 30) -> list[dict]:
    """On a CUDA GPU, Llama-3-8B's heads (32/8, d = 128, fp16): each call checked against the
    float64 reference, then timed two ways, interleaved round by round (bench.compare): per call
    (CUDA events around the Python call, L2 flushed before it: what a caller sees, the Python
    launch path included where it outlasts the flush) and device time alone (the same call
    replayed from a CUDA graph). Beside them, predict_latency's time on this GPU's roofline row.
    Stops at the deadline."""
    hw = gpu_hardware()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bench.spin_up()
    out = []
    for batch, ctx, split_list in cases:
        if out_of_time(reserve_s=8):
            break
        args = random_paged_inputs([ctx] * batch, 32, 8, 128, torch.float16,
                                   pool=batch * (ctx // 16) + 4, device="cuda")
        ref = paged_attention_reference(*(x.cpu().double() if x.is_floating_point() else x.cpu()
                                          for x in args))
        runs = {}   # label -> (splits, error, call)
        for s in split_list:
            splits = s or default_splits(batch, 8, ctx, sms)
            if any(n == splits for n, _, _ in runs.values()):
                continue   # the default is one of the forced counts: timed once
            fn = lambda a=args, n=splits: paged_attention(*a, num_splits=n, check_inputs=False)
            err = assert_close(fn(), ref, dtype=torch.float16, matmul=True,
                               what=f"paged_attention {batch}x{ctx} splits={splits}")
            runs[f"{splits} (default)" if s is None else str(splits)] = splits, err, fn
        fns = {label: fn for label, (_, _, fn) in runs.items()}
        per_call = bench.compare(fns, warmup=3, repeat=repeat)
        device = bench.compare({k: bench.graphed(f) for k, f in fns.items()}, warmup=3,
                               repeat=repeat)
        for label, (splits, err, _) in runs.items():
            io = io_model(ctx, 32, 8, 128, splits, batch)
            row = {"batch": batch, "ctx": ctx, "splits": label, "rel err": err,
                   "µs per call": per_call[label].median_s * 1e6,
                   "µs graph": device[label].median_s * 1e6,
                   "GB/s graph": io["bytes"] / device[label].median_s / 1e9}
            if hw is not None:
                p = predict_latency(ctx, 32, 8, 128, splits, hw, batch=batch)
                row["predicted µs (device)"] = p["time_s"] * 1e6
                row["predicted bound"] = p["bound"]
            out.append(record(f"paged_attention, CUDA ({hw or 'unlisted GPU'}), 32/8 heads, "
                              "d=128, fp16: measured, predicted from counted bytes beside", row))
    return out


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
    for hw in ("H100 SXM", "H200"):
        for s in (1, 2, 4, 8, 17, 33, 64):
            p = predict_latency(32768, 32, 8, 128, s, hw)
            record(f"predicted {hw} decode attention, batch 1, 32k tokens (prediction)",
                   {"splits": s, "µs": p["time_s"] * 1e6, "SMs busy": p["sms_busy"],
                    "bound": p["bound"]})
    if gpu_available() and not INTERPRET:
        gpu_table()
    return 0
