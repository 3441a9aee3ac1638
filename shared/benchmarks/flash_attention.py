"""FlashAttention: the measurements behind the lab, and `kclub bench flash-attention`.

Anywhere: HBM traffic and tl.dot FLOPs of standard vs flash attention, counted in Triton's
interpreter (shared.iocount); the exact IO model those counts obey; the extra memory each keeps
for the backward pass; roofline predictions on named GPUs, and the TFLOP/s our kernels should
reach at FA2's shapes with the configs each GPU gets (`predicted_tflops`). On a CUDA machine:
forward and backward TFLOP/s of `flash_attention` against torch's scaled_dot_product_attention,
timed interleaved in the same process, with a bootstrap interval on each speed ratio and the
prediction beside each row.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch

from kernels.attention import BlockSizes, attention_reference, flash_attention, standard_attention
from kernels.attention._args import padded_head_dim
from kernels.attention.configs import default_blocks, for_capability
from kernels.device import INTERPRET, gpu_available
from shared import bench, iocount, roofline
from shared.benchmarks import gpu_hardware, out_of_time, pct_of_roofline, record
from shared.benchmarks.flash_attention_compiled import CLOCK_HZ, MUFU_PER_CLOCK_PER_SM

# FlashAttention-1 Fig. 2 (left): GPT-2 medium attention, forward + backward, A100.
GPT2_MEDIUM = dict(batch=64, heads=16, n=1024, d=64)
PAPER = {"standard_gb": 40.3, "flash_gb": 4.4, "standard_ms": 41.7, "flash_ms": 7.3,
         "fa2_a100_fraction": 0.73, "fa3_h100_tflops": 740.0}
IMPLS = {"standard": standard_attention, "flash": flash_attention}
_BMM_BLOCK_K = 64   # the K step of standard.py's bmm kernel


@dataclass(frozen=True)
class Counted:
    """Traffic and dot FLOPs of one forward and one backward pass (bytes, FLOPs)."""

    fwd_bytes: int
    bwd_bytes: int
    fwd_flops: int
    bwd_flops: int

    @property
    def bytes(self) -> int:
        return self.fwd_bytes + self.bwd_bytes

    @property
    def flops(self) -> int:
        return self.fwd_flops + self.bwd_flops

    def scaled(self, factor: int) -> Counted:
        return Counted(*(factor * x for x in (self.fwd_bytes, self.bwd_bytes, self.fwd_flops,
                                              self.bwd_flops)))


def count(impl: str, n: int, d: int = 64, *, causal: bool = False, heads: int = 1,
          blocks: BlockSizes | None = None, dtype=torch.float16, seed: int = 0,
          backward: bool = True) -> Counted:
    """Run `impl` forward (and backward) once in the interpreter and count each pass."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, heads, n, d, generator=g).to(dtype) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    with iocount.count() as fwd:
        o = IMPLS[impl](q, k, v, causal=causal, block_sizes=blocks)
    with iocount.count() as bwd:
        if backward:
            o.backward(do)
    return Counted(fwd.bytes_total, bwd.bytes_total, fwd.dot_flops, bwd.dot_flops)


def flash_io_model(n: int, d: int, blocks: BlockSizes, itemsize: int = 2) -> Counted:
    """Exact bytes and FLOPs of our flash kernels, one head, seq_q = seq_k = n, not causal.

    Forward (FA1 Thm. 2): Q read once, K and V once per query block, O written once, plus L.
    Backward: D pre-pass (read O, dO; write D); dK/dV kernel reads K, V once and Q, dO, L, D
    once per key block; dQ kernel reads Q, dO, L, D once and K, V once per query block.
    """
    qb, kb = -(-n // blocks.block_m), -(-n // blocks.block_n)
    nd, f32 = n * d * itemsize, 4 * n
    fwd = nd + 2 * qb * nd + nd + f32
    pre = 2 * nd + f32
    dkdv = 2 * nd + kb * (2 * nd + 2 * f32) + 2 * nd
    dq = 2 * nd + 2 * f32 + 2 * qb * nd + nd
    # tl.dot FLOPs on whole tiles (padding included): 2 dots per tile pair forward; backward
    # 4 in the dK/dV kernel (S, dV, dP, dK) and 3 in the dQ kernel (S, dP, dQ).
    tiles = qb * blocks.block_m * kb * blocks.block_n * padded_head_dim(d)
    return Counted(fwd, pre + dkdv + dq, 4 * tiles, 14 * tiles)


def standard_io_model(n: int, d: int, blocks: BlockSizes, itemsize: int = 2) -> Counted:
    """Exact bytes and FLOPs of standard_attention (kernels/attention/standard.py), one head,
    seq_q = seq_k = n, not causal: every request, as if there were no cache.

    A bmm C = A·B reads its A rows once per column of C tiles and its B columns once per row of
    C tiles (the tile re-reads an L2 would serve), and writes C once; the softmax kernels read
    and write each n×n matrix once (P = softmax(S); dS from P and dP).
    """
    bm, bn, bk = blocks.block_m, blocks.block_n, _BMM_BLOCK_K

    def bmm(m, k, cols):  # (elements moved, tl.dot FLOPs on whole tiles)
        moved = m * k * -(-cols // bn) + k * cols * -(-m // bm) + m * cols
        return moved, 2 * -(-m // bm) * bm * -(-cols // bn) * bn * -(-k // bk) * bk

    s_, pv = bmm(n, d, n), bmm(n, n, d)             # S = QKᵀ and O = PV; dP = dO Vᵀ is like S
    fwd = s_[0] + 2 * n * n + pv[0]                 # + softmax: read S, write P
    bwd = 3 * pv[0] + s_[0] + 3 * n * n             # dV, dQ, dK like PV; dP; read P, dP, write dS
    return Counted(itemsize * fwd, itemsize * bwd, s_[1] + pv[1], 3 * pv[1] + s_[1])


def cached_io_model(impl: str, n: int, d: int, blocks: BlockSizes, itemsize: int = 2) -> Counted:
    """The other bound: a perfect cache *within* each kernel, so each tensor a kernel touches
    crosses HBM once (flash: K and V re-reads per query tile; standard: the bmm tile re-reads).
    Kernels still hand their results to each other through HBM. Same FLOPs as the exact model.
    """
    nd, f32 = n * d * itemsize, 4 * n
    if impl == "flash":
        exact = flash_io_model(n, d, blocks, itemsize)
        # fwd: Q, K, V, O, L. bwd: pre-pass O, dO -> D; dK/dV: Q, K, V, dO, L, D -> dK, dV;
        # dQ: Q, K, V, dO, L, D -> dQ
        return Counted(4 * nd + f32, (2 * nd + f32) + (6 * nd + 2 * f32) + (5 * nd + 2 * f32),
                       exact.fwd_flops, exact.bwd_flops)
    if impl == "standard":
        exact = standard_io_model(n, d, blocks, itemsize)
        nn = n * n * itemsize
        # fwd: S = QKᵀ (Q, K, S), softmax (S, P), O = PV (P, V, O);
        # bwd: dV (P, dO, dV), dP (dO, V, dP), dS (P, dP, dS), dQ (dS, K, dQ), dK (dS, Q, dK)
        return Counted(4 * nn + 4 * nd, 7 * nn + 8 * nd, exact.fwd_flops, exact.bwd_flops)
    raise ValueError(f"impl must be 'flash' or 'standard', got {impl!r}")


def io_model(impl: str, n: int, d: int, blocks: BlockSizes, itemsize: int = 2) -> Counted:
    """The exact (no-cache) model of `impl`: what `count(impl, n, d, blocks=blocks)` returns."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {sorted(IMPLS)}, got {impl!r}")
    model = flash_io_model if impl == "flash" else standard_io_model
    return model(n, d, blocks, itemsize)


def asymptotic_ratio(d: int, blocks: BlockSizes) -> float:
    """lim N→∞ of standard / flash bytes (fwd + bwd, no cache): both are Θ(N²) (Theorem 2), so
    the advantage of one head saturates at the ratio of their N² coefficients. For N a multiple
    of both tiles each model is a·N² + b·N exactly, so a = (f(2N) − 2·f(N)) / (2·N²)."""
    n = blocks.block_m * blocks.block_n

    def lead(impl):
        return (io_model(impl, 2 * n, d, blocks).bytes - 2 * io_model(impl, n, d, blocks).bytes
                ) / (2 * n * n)
    return lead("standard") / lead("flash")


def compulsory(n: int, d: int, itemsize: int = 2) -> Counted:
    """The floor: every input and output touched once (a perfect cache), FLOPs left at 0.

    Forward reads Q, K, V and writes O and L; backward reads Q, K, V, O, dO and L and writes
    dQ, dK, dV."""
    nd = n * d * itemsize
    return Counted(4 * nd + 4 * n, 8 * nd + 4 * n, 0, 0)


def model_flops(batch: int, heads: int, n: int, d: int, causal: bool) -> tuple[float, float]:
    """Conventional attention FLOPs (as FA2/FA3 report TFLOP/s): forward 4·N²·d per head,
    backward 2.5× that; half of each with a causal mask."""
    fwd = 4 * batch * heads * n * n * d / (2 if causal else 1)
    return fwd, 2.5 * fwd


def predict(c: Counted, hw: str) -> dict[str, roofline.Prediction]:
    """Roofline time of the forward and backward pass from counted FLOPs and bytes (fp16)."""
    return {"fwd": roofline.predict(c.fwd_flops, c.fwd_bytes, hw, "fp16"),
            "bwd": roofline.predict(c.bwd_flops, c.bwd_bytes, hw, "fp16")}


def extra_memory(ns=(128, 256, 512), d: int = 64, heads: int = 4) -> list[dict]:
    """Memory beyond the inputs of the reference and of the flash kernel, fp32 forward +
    backward, measured in a fresh process (see `memory_table`); one row per (impl, n)."""
    code = ("import json, kernels; from shared.benchmarks.flash_attention import memory_table; "
            f"print(json.dumps(memory_table({tuple(ns)}, {d}, {heads})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=900, check=False)
    if out.returncode:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(ns, d: int, heads: int) -> list[dict]:
    """Two measurements per run (Linux + glibc; run it in its own process):

    - saved_bytes: what autograd keeps between forward and backward (saved-tensor hooks),
      not counting the inputs, which any implementation keeps;
    - peak_bytes: growth of the peak resident set during forward + backward (VmHWM, reset
      through /proc/self/clear_refs). glibc is told to mmap every block >= 128 KiB and
      unmap it on free, so freed tensors leave the resident set instead of being cached.
    """
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD, fixed
    fns = {"reference": attention_reference, "flash": flash_attention}
    for fn in fns.values():
        _forward_backward(fn, 64, d, heads)            # warm-up: caches, first launches
    rows = []
    for n in ns:
        for impl, fn in fns.items():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                            # VmHWM := VmRSS
            before = _rss_kb("VmRSS")
            saved = _forward_backward(fn, n, d, heads)
            rows.append({"impl": impl, "n": n, "saved_bytes": saved,
                         "peak_bytes": 1024 * (_rss_kb("VmHWM") - before)})
    return rows


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _forward_backward(fn, n: int, d: int, heads: int) -> int:
    """fp32 forward + backward on fresh inputs; returns the non-input bytes autograd saved."""
    q, k, v, do = (torch.randn(1, heads, n, d) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    inputs = {x.data_ptr() for x in (q, k, v)}
    saved = []

    def pack(t):
        if t.data_ptr() not in inputs:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = fn(q, k, v)
    o.backward(do)
    return sum(saved)


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


def main() -> int:
    if INTERPRET:
        print("HBM traffic, counted in Triton's interpreter (fp16, one head, fwd + bwd)")
        for n in (256, 512, 1024):
            if out_of_time():
                return 0
            c = {impl: count(impl, n) for impl in IMPLS}
            record("HBM traffic, counted (fp16, one head, fwd + bwd)",
                   {"n": n, "standard MB": c["standard"].bytes / 1e6,
                    "flash MB": c["flash"].bytes / 1e6,
                    "ratio": c["standard"].bytes / c["flash"].bytes})
        # every head is one more column of identical programs: one head's count x heads is exact
        gpt = {impl: x.scaled(GPT2_MEDIUM["batch"] * GPT2_MEDIUM["heads"]) for impl, x in c.items()}
        for impl, key in (("standard", "standard_gb"), ("flash", "flash_gb")):
            record("GPT-2 medium attention (N=1024, d=64, 16 heads, batch 64), fwd + bwd",
                   {"impl": impl, "counted GB": gpt[impl].bytes / 1e9,
                    "paper GB (measured on A100)": PAPER[key]})
        for hw in ("A100 80GB", "H100 SXM"):
            pred = predict(gpt["flash"], hw)
            record("GPT-2 medium flash attention, roofline prediction",
                   {"hardware": hw, "fwd ms": pred["fwd"].time_s * 1e3,
                    "fwd bound": pred["fwd"].bound, "bwd ms": pred["bwd"].time_s * 1e3,
                    "bwd bound": pred["bwd"].bound, "FA1 measured ms (A100)": PAPER["flash_ms"]})
        for hw in ("H100 SXM", "H200"):
            predicted_table(hw)
    if gpu_available() and not INTERPRET:
        print("TFLOP/s (fp16, conventional FLOPs, CUDA events): ours vs torch SDPA, interleaved")
        gpu_table()
    return 0
