"""Weight-only quantization: the measurements behind the lab, and `kclub bench quantization`.

- Bytes of the dequant-matmul kernels: counted in Triton's interpreter (shared.iocount) against
  an exact IO model of the launches (the matmul, and the split-K reduction when K is split), and
  the minimum DRAM traffic of y = x Wᵀ per format.
- The decode floor: the larger of the DRAM time of those bytes and the issue time of the
  decode kernels' instructions, counted per weight in their sm_90 SASS (dequantizing is ALU
  work an SM issues at 128 thread-instructions a clock). Predictions, from counted work.
- The roofline crossover: predicted time of a [M, K] × [K, N] matmul with fp16 weights and with
  each format's weights on named hardware; weight-only quantization pays while the fp16 matmul is
  memory bound and stops paying once M passes the fp16 ridge (the int4 kernel itself turns
  compute bound 4× earlier). Predictions, from counted work.
- This CPU, measured: torch's own weight-only CPU kernels (`_weight_int8pack_mm`, and
  `_weight_int4pack_mm_for_cpu`, what gpt-fast's int8/int4 call on a CPU) against torch's fp32
  and bf16 linear at the same shape, interleaved rounds with bootstrap intervals; tokens/s and
  effective GB/s (weight bytes / time) as gpt-fast reports them. Our Triton kernel runs in the
  interpreter here, so it is not timed on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton

from kernels.device import INTERPRET, SM_COUNT, gpu_available
from kernels.quant import quantize, quantized_matmul, quantized_matmul_reference
from kernels.quant.dequant_triton import REDUCE_BLOCK_N
from kernels.quant.matmul_triton import CONFIGS, config_for, plan
from shared import bench, iocount, roofline
from shared.benchmarks import gpu_hardware, out_of_time, pct_of_roofline, record


def weight_bytes(fmt: str, k: int, n: int, group: int | None = None,
                 double_quant: bool = True) -> float:
    """Bytes of one [N, K] weight as stored, constants included ("fp16" for the baseline)."""
    if fmt == "fp16":
        return 2.0 * k * n
    if fmt in ("int8", "llm.int8"):
        return k * n + 4.0 * n
    codes = k * n / 2
    groups = k * n / group
    if fmt == "int4":
        return codes + 3 * groups                      # fp16 scale + uint8 zero
    if not double_quant:
        return codes + 4 * groups                      # fp32 absmax
    return codes + groups + 4 * math.ceil(groups / 256) + 4


def io_model(fmt: str, m: int, k: int, n: int, group: int | None, x_bytes: int = 2,
             sms: int = SM_COUNT[0]) -> int:
    """Exact bytes the launches load and store (what iocount sees), for the plan that
    `quantized_matmul` makes on `sms` SMs (default: the interpreter's): every column-tile
    program rereads its x rows; every row tile rereads the weight and its constants; NF4
    gathers one 4-byte table entry per weight slot of its tile, padded columns included (a
    64-byte table: L1 on a GPU, not DRAM; `min_traffic` leaves it out). Split K: each split
    stores fp32 (llm.int8: int32) partials [M, N], the reduction reads them back, each of its
    row programs reads the column scales (8-bit formats) and the row's scale (llm.int8)."""
    p = plan(m, n, k, fmt, group, sms)
    cfg, splits = p.config, p.splits
    tiles_m = 1 if cfg.gemv else triton.cdiv(m, cfg.block_m)
    tiles_n = triton.cdiv(n, cfg.block_n)
    steps = triton.cdiv(k, cfg.step(fmt, group))
    xb = 1 if fmt == "llm.int8" else x_bytes
    loads = m * k * xb * tiles_n
    if fmt in ("int8", "llm.int8"):
        loads += tiles_m * k * n
        if splits == 1:   # the epilogue's scales, per program
            loads += 4 * n * tiles_m + (4 * m * tiles_n if fmt == "llm.int8" else 0)
        else:             # ... per program of the reduction
            loads += 4 * n * m + (4 * m * triton.cdiv(n, REDUCE_BLOCK_N)
                                  if fmt == "llm.int8" else 0)
    elif fmt == "int4":
        loads += tiles_m * (k * n // 2 + steps * 3 * n)
    else:                                              # nf4 with double quantization
        table = 4 * k * cfg.block_n * tiles_n
        loads += tiles_m * (k * n // 2 + steps * (n + 4 * n + 4 * tiles_n) + table)
    out = m * n * (4 if fmt == "llm.int8" else x_bytes)
    partials = 4 * splits * m * n if splits > 1 else 0
    return loads + out + 2 * partials


def counted(fmt: str, m: int, k: int, n: int, group: int | None, seed: int = 0):
    """iocount of one quantized_matmul call (fp16 x): bytes loaded + stored, launches."""
    g = torch.Generator().manual_seed(seed)
    qw = quantize(torch.randn(n, k, generator=g), fmt, group_size=group)
    x = torch.randn(m, k, generator=g).half()
    with iocount.count() as c:
        quantized_matmul(x, qw)
    return c


def min_traffic(fmt: str, m: int, k: int, n: int, group: int | None) -> float:
    """DRAM bytes with perfect on-chip reuse: x and y once (fp16), the weight once."""
    return 2.0 * m * k + weight_bytes(fmt, k, n, group) + 2.0 * m * n


def predicted_time(fmt: str, m: int, k: int, n: int, group: int | None, hw: str) -> float:
    return roofline.predict(2.0 * m * k * n, min_traffic(fmt, m, k, n, group), hw, "fp16").time_s


def speedup_curve(fmt: str, ms, k: int, n: int, group: int | None, hw: str) -> list[float]:
    """Predicted fp16-time / format-time per M (the dequantization's ALU work not counted)."""
    return [predicted_time("fp16", m, k, n, None, hw) / predicted_time(fmt, m, k, n, group, hw)
            for m in ms]


# Thread-instructions per weight in the K loop of the decode kernels, counted in the sm_90
# SASS of `kclub compile`'s Llama-7B cases (cuobjdump -sass; the loop from its label to its
# backward branch, over the weights one thread handles in one iteration: 128 for the 4-bit
# gemv, 64 for the 8-bit one and for the 16-row dot tile, 32 for nf4's there, g = 64). The
# `gemv` rows are at M = 1; the `decode` rows are the 16-row tile's, whatever M ≤ 16 is.
# Re-count them when the kernels change.
ISSUE_PER_WEIGHT = {"gemv": {"int4": 5.4, "nf4": 7.0, "int8": 5.1, "llm.int8": 3.0},
                    "decode": {"int4": 8.7, "nf4": 10.3, "int8": 9.0, "llm.int8": 4.1}}
ISSUE_PER_SM_CLOCK = 128      # 4 schedulers × one warp-instruction of 32 threads
SM_CLOCK_HZ = 1.98e9          # H100 SXM and H200 boost; the H200 ran at 1980 MHz under load


def config_name(m: int) -> str:
    """The name in CONFIGS of the configuration quantized_matmul runs at M = m."""
    return next(name for name, cfg in CONFIGS.items() if cfg == config_for(m))


def decode_floor(fmt: str, m: int, k: int, n: int, group: int | None, hw: str) -> dict:
    """Predicted floor of quantized_matmul at decode (M ≤ 16) on `hw`: the DRAM time of
    `min_traffic` plus the split partials (written and read back: an upper bound, they mostly
    stay in L2) and the issue time of ISSUE_PER_WEIGHT; the larger is the prediction."""
    row = roofline.hardware(hw)
    p = plan(m, n, k, fmt, group, row.sms)
    name = config_name(m)
    moved = min_traffic(fmt, m, k, n, group) + (8.0 * p.splits * m * n if p.splits > 1 else 0)
    dram = moved / row.mem_bw
    issue = k * n * ISSUE_PER_WEIGHT[name][fmt] / (row.sms * ISSUE_PER_SM_CLOCK * SM_CLOCK_HZ)
    return {"config": name, "splits": p.splits, "DRAM us": dram * 1e6, "issue us": issue * 1e6,
            "predicted us": max(dram, issue) * 1e6}


def crossover(fmt: str, k: int, n: int, group: int | None, hw: str) -> tuple[float, float]:
    """(M where the format's matmul turns compute bound, M where fp16's does: past it
    weight-only quantization saves nothing), from ridge = peak / bandwidth."""
    ridge = roofline.hardware(hw).ridge("fp16")

    def turn(fmt_):   # 2MKN / bytes(M) = ridge, bytes linear in M: solve for M
        b0, b1 = min_traffic(fmt_, 0, k, n, group), 2.0 * (k + n)
        return ridge * b0 / (2.0 * k * n - ridge * b1)
    return turn(fmt), turn("fp16")


def cpu_peers(k: int, n: int, m: int, *, repeat: int = 10, group: int = 128, seed: int = 0):
    """Interleaved timings on this CPU of y = x Wᵀ at [m, k] × [k, n]: fp32 and bf16 linear,
    torch's int8 weight-only kernel and its int4 one (gpt-fast's CPU path; bf16 activations).
    Returns (timings, weight bytes per impl). The int8 peer is checked against its formula."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    scale = w.abs().amax(1) / 127
    q8 = torch.round(w / scale[:, None]).to(torch.int8)
    s8 = scale.bfloat16()
    y8 = torch.ops.aten._weight_int8pack_mm(xb, q8, s8)
    ref8 = xb.float() @ (q8.float() * s8.float()[:, None]).t()
    if not torch.allclose(y8.float(), ref8, rtol=2e-2, atol=1e-2 * ref8.abs().max().item()):
        raise AssertionError("torch's int8 weight-only kernel disagrees with q · scale")
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.rand(k // group, n, 2, generator=g).bfloat16()
    fns = {
        "fp32 linear": lambda: F.linear(x, w),
        "bf16 linear": lambda: F.linear(xb, wb),
        "int8 (torch)": lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8),
        "int4 (torch)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q4, group, sz),
    }
    sizes = {"fp32 linear": 4.0 * k * n, "bf16 linear": 2.0 * k * n,
             "int8 (torch)": k * n + 2.0 * n, "int4 (torch)": k * n / 2 + 4.0 * n * k / group}
    bnb = bitsandbytes_nf4(wb)
    if bnb is not None:   # bitsandbytes' CPU path, when it is installed: NF4, block 64
        matmul, stored, dequantized = bnb
        ref = xb.float() @ dequantized.float().t()
        if not torch.allclose(matmul(xb).float(), ref, rtol=2e-2, atol=1e-2 * ref.abs().max()):
            raise AssertionError("bitsandbytes' 4-bit matmul disagrees with its dequantized weight")
        fns["nf4 (bitsandbytes)"] = lambda: matmul(xb)
        sizes["nf4 (bitsandbytes)"] = stored
    return bench.compare(fns, warmup=2, repeat=repeat), sizes


def bitsandbytes_nf4(w: torch.Tensor, block: int = 64):
    """bitsandbytes' NF4 of w (double-quantized absmax, its `compress_statistics`): (x -> x Wᵀ
    through its matmul_4bit, stored bytes, its dequantized weight); None if not installed."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    q, state = bnbf.quantize_4bit(w, blocksize=block, quant_type="nf4",
                                  compress_statistics=True)
    stored = q.numel() * q.element_size() + sum(
        t.numel() * t.element_size() for t in (state.absmax, state.state2.absmax,
                                               state.state2.code, state.code))
    return (lambda x: bnb.matmul_4bit(x, q.t(), quant_state=state), stored,
            bnbf.dequantize_4bit(q, state))


def main() -> int:
    """`kclub bench quantization`: counted bytes (interpreter), H100 crossover (prediction),
    torch's CPU peers at Llama-7B's up_proj, and on a CUDA machine our kernel against cuBLAS."""
    if INTERPRET:
        for fmt, group in (("int8", None), ("int4", 128), ("nf4", 64)):
            for m in (1, 5):
                c = counted(fmt, m, 512, 300, group)
                record("bytes (Triton interpreter), K=512, N=300", {
                    "fmt": fmt, "M": m, "launches": c.launches, "counted": c.bytes_total,
                    "model": io_model(fmt, m, 512, 300, group)})
    k, n = 4096, 11008
    for fmt, group in (("int8", None), ("int4", 128), ("nf4", 64)):
        own, fp16 = crossover(fmt, k, n, group, "H100 SXM")
        record("crossover H100 (prediction)", {"fmt": fmt, "compute-bound M": own,
                                               "fp16 ridge M": fp16})
        for m in (1, 16):
            record("decode floor H200, [M, 4096] x [4096, 11008] (prediction)",
                   {"fmt": fmt, "M": m, **decode_floor(fmt, m, k, n, group, "H200")})
    if gpu_available() and not INTERPRET:
        _cuda(k, n)
        return 0
    for m in (1, 16, 256):
        if out_of_time(reserve_s=5):
            break
        t, sizes = cpu_peers(k, n, m, repeat=5)
        for name, timing in t.items():
            record("this CPU, [M, 4096] x [4096, 11008]", {
                "M": m, "impl": name, "ms": timing.median_s * 1e3,
                "tokens/s": m / timing.median_s, "GB/s": sizes[name] / timing.median_s / 1e9})
    return 0


def _device_time(fns: dict) -> tuple[dict | None, str | None]:
    """The same calls replayed from CUDA graphs and timed interleaved: device time alone, which
    is what decode_floor predicts. (None, why) if a call cannot be captured."""
    try:
        graphs = {name: bench.graphed(f) for name, f in fns.items()}
    except RuntimeError as e:   # a host sync inside the call: capture refuses it
        return None, f"not captured: {str(e).splitlines()[0][:120]}"
    return bench.compare(graphs, warmup=3, repeat=30), None


def _cuda(k: int, n: int) -> None:
    """On a GPU: each format's kernel checked against dequantize-then-matmul, then timed
    against cuBLAS on the fp16 weight in interleaved rounds, two ways: per call (CUDA events
    around the Python call: what a caller sees, the launch path included) and device time
    alone (CUDA-graph replays, what the prediction is for), each with a bootstrap interval of
    the ratio. GB/s counts the minimal traffic, as gpt-fast reports it."""
    hw = gpu_hardware()
    bench.spin_up()
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    weights = {fmt: quantize(w, fmt, group_size=g)
               for fmt, g in (("int8", None), ("int4", 128), ("nf4", 64), ("llm.int8", None))}
    for m in (1, 16, 512):
        if out_of_time(reserve_s=10):
            return
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        fns = {"cuBLAS fp16": lambda x=x: x @ w.t()}
        for fmt, qw in weights.items():
            got = quantized_matmul(x, qw).double()
            ref = quantized_matmul_reference(x.double(), qw).double()
            record(f"quantized_matmul vs dequantize-then-matmul, CUDA, [M, {k}] x [{k}, {n}]",
                   {"fmt": fmt, "M": m, "relative error": ((got - ref).norm() / ref.norm()).item()})
            fns[fmt] = lambda x=x, qw=qw: quantized_matmul(x, qw)
        t = bench.compare(fns, warmup=3, repeat=30)
        dev, why = _device_time(fns)
        for fmt, qw in weights.items():
            ours = t[fmt].median_s
            moved = min_traffic(fmt, m, k, n, qw.group_size)
            # the floor is for the decode kernels, on a GPU with a roofline row
            floor = decode_floor(fmt, m, k, n, qw.group_size, hw) if hw and m <= 16 else {}
            record(f"quantized_matmul vs cuBLAS fp16, CUDA, [M, {k}] x [{k}, {n}]", {
                "fmt": fmt, "M": m, "config": config_name(m), "splits": floor.get("splits"),
                "us": ours * 1e6, "predicted us": floor.get("predicted us"),
                "cuBLAS us": t["cuBLAS fp16"].median_s * 1e6,
                "speed-up": str(bench.ratio(t["cuBLAS fp16"], t[fmt])), "tokens/s": m / ours,
                "GB/s": moved / ours / 1e9,
                "% of roofline": pct_of_roofline(ours, 2.0 * m * k * n, moved, hw, "fp16"),
                "us graph": dev[fmt].median_s * 1e6 if dev else why,
                "cuBLAS us graph": dev["cuBLAS fp16"].median_s * 1e6 if dev else None,
                "speed-up graph": str(bench.ratio(dev["cuBLAS fp16"], dev[fmt])) if dev else None})
