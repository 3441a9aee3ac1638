"""FlashAttention: the measurements behind the lab, and `kclub bench flash-attention`.

Anywhere: HBM traffic and tl.dot FLOPs of standard vs flash attention, counted in Triton's
interpreter (shared.iocount); the exact IO model those counts obey; the extra memory each keeps
for the backward pass; roofline predictions on named GPUs. The GPU side — the TFLOP/s our
kernels should reach at FA2's shapes, and on a CUDA machine their TFLOP/s against torch's
scaled_dot_product_attention — is in flash_attention_gpu.py; `main` runs both.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass

import torch

from kernels.attention import BlockSizes, attention_reference, flash_attention, standard_attention
from kernels.attention._args import padded_head_dim
from kernels.device import INTERPRET, gpu_available
from shared import iocount, roofline
from shared.benchmarks import out_of_time, record

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


def main() -> int:
    from shared.benchmarks.flash_attention_gpu import gpu_table, predicted_table

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
