"""The roofline model: what a kernel's counted FLOPs and bytes predict on named hardware.

time ≥ max(FLOPs / peak FLOP/s, bytes / memory bandwidth). Peaks are the vendors' dense
(no-sparsity) datasheet numbers; "this CPU" is measured on this machine, once per build/.
Everything this module returns is a prediction, and labs must say so when they print it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from shared.bench import measure
from shared.paths import build_dir

T = 1e12


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: dict[str, float]  # dtype name -> FLOP/s, dense
    mem_bw: float                 # bytes/s to main memory (HBM)
    sram_bytes: int = 0           # on-chip memory per SM / core that a kernel tiles into
    source: str = ""
    sms: int = 0                  # streaming multiprocessors (GPUs only)
    max_warps_per_sm: int = 64
    # HBM load-to-use latency. Approximate: microbenchmarks report 400-600 core cycles on A100
    # and H100 (≈ 300-500 ns); `occupancy_bandwidth` is only as good as this number.
    mem_latency_s: float = 500e-9

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ValueError(f"dtype must be one of {sorted(self.peak_flops)} for {self.name}, "
                             f"got {dtype!r}")
        return self.peak_flops[dtype]

    def ridge(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel is compute bound."""
        return self.peak(dtype) / self.mem_bw


HARDWARE: dict[str, Hardware] = {
    "H100 SXM": Hardware(
        "H100 SXM", {"fp16": 989.4 * T, "bf16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T,
                     "fp8": 1978.9 * T}, 3.35e12, 228 * 1024, "NVIDIA H100 datasheet, SXM5",
        sms=132),
    "H200": Hardware(
        "H200", {"fp16": 989.4 * T, "bf16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T,
                 "fp8": 1978.9 * T}, 4.8e12, 228 * 1024, "NVIDIA H200 datasheet, SXM", sms=132),
    "A100 80GB": Hardware(
        "A100 80GB", {"fp16": 312 * T, "bf16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T},
        2.039e12, 164 * 1024, "NVIDIA A100 datasheet, SXM 80 GB", sms=108),
    # The SXM3 module of the DGX-2/2H that Megatron-LM ran on is the same GV100 (32 GB); the
    # datasheet's figures are the NVLink (SXM2) column's. No bf16 or tf32 on Volta.
    "V100 SXM3": Hardware(
        "V100 SXM3", {"fp16": 125 * T, "fp32": 15.7 * T}, 900e9, 96 * 1024,
        "NVIDIA Tesla V100 datasheet, NVLink column: 125 TFLOP/s Tensor Core, 15.7 fp32, "
        "900 GB/s HBM2; Volta whitepaper: 80 SMs, up to 96 KB shared memory per SM", sms=80),
    "TPU v5e": Hardware(
        "TPU v5e", {"bf16": 197 * T, "fp16": 197 * T, "int8": 394 * T}, 819e9, 128 * 1024**2,
        "Google Cloud TPU v5e documentation (VMEM is per core, sized by the compiler)"),
}


def hardware(hw: Hardware | str) -> Hardware:
    """A Hardware row by name: the datasheet rows in HARDWARE, or "this CPU" (measured)."""
    if isinstance(hw, Hardware):
        return hw
    if hw == "this CPU":
        return this_cpu()
    if hw not in HARDWARE:
        raise ValueError(f"hw must be one of {[*HARDWARE, 'this CPU']}, got {hw!r}")
    return HARDWARE[hw]


@dataclass(frozen=True)
class Prediction:
    time_s: float
    compute_s: float
    memory_s: float
    bound: str        # "compute" or "memory"
    intensity: float  # FLOP / byte
    hardware: str
    dtype: str
    flops: float

    @property
    def flops_per_s(self) -> float:
        """The FLOP rate the predicted time implies (the peak only when compute bound)."""
        return self.flops / self.time_s if self.time_s else 0.0


def predict(flops: float, bytes_moved: float, hw: Hardware | str, dtype: str = "fp16"
            ) -> Prediction:
    """Roofline lower bound on time for `flops` of math and `bytes_moved` of HBM traffic."""
    hw = hardware(hw)
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"flops and bytes_moved must be >= 0, got {flops=} {bytes_moved=}")
    compute = flops / hw.peak(dtype)
    memory = bytes_moved / hw.mem_bw
    return Prediction(max(compute, memory), compute, memory,
                      "compute" if compute >= memory else "memory",
                      flops / bytes_moved if bytes_moved else float("inf"), hw.name, dtype,
                      flops)


def occupancy_bandwidth(hw: Hardware | str, occupancy: float,
                        bytes_in_flight_per_warp: float) -> float:
    """HBM bandwidth a kernel can sustain at this occupancy, by Little's law:
    bytes in flight = bandwidth × latency, so bandwidth ≤ resident warps × bytes each warp keeps
    in flight / latency, capped by the datasheet bandwidth. `occupancy` is the fraction of the
    SM's warp slots resident (kernels.compile_only reports it from registers and shared memory);
    bytes in flight per warp is what one warp's outstanding loads cover (a pipelined kernel:
    num_stages × its tile bytes / num_warps). A prediction, and a rough one: see mem_latency_s."""
    hw = hardware(hw)
    if not hw.sms:
        raise ValueError(f"hw must be a GPU with an SM count, got {hw.name}")
    if not 0 < occupancy <= 1:
        raise ValueError(f"occupancy must be in (0, 1], got {occupancy}")
    warps = occupancy * hw.max_warps_per_sm * hw.sms
    return min(hw.mem_bw, warps * bytes_in_flight_per_warp / hw.mem_latency_s)


def this_cpu(refresh: bool = False) -> Hardware:
    """This machine as a roofline: fp32 matmul FLOP/s and copy bandwidth, measured once and
    cached in build/hardware-cpu.json (torch, all cores; the median of a few runs)."""
    path = build_dir() / "hardware-cpu.json"
    if path.exists() and not refresh:
        data = json.loads(path.read_text())
        return Hardware(**data)
    import torch

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    src = torch.randn(32 * 1024**2 // 4)  # 32 MiB: past the caches
    dst = torch.empty_like(src)

    def best(fn):
        return measure(fn, warmup=1, repeat=5).median_s

    flops = 2 * n**3 / best(lambda: torch.mm(a, b))
    bw = 2 * src.numel() * 4 / best(lambda: dst.copy_(src))  # read + write
    hw = Hardware("this CPU", {"fp32": flops}, bw, 0, "measured: torch.mm 1024², 32 MiB copy")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(hw)))
    return hw


def plot_roofline(ax, hws: list[Hardware | str], points: list[tuple[str, float, float]],
                  dtype: str = "fp16") -> None:
    """Draw each hardware's roof and each (label, flops, bytes) point at its intensity.

    A point sits on the lowest roof it would reach: attainable = min(peak, intensity × bw)."""
    import numpy as np

    hws = [hardware(h) for h in hws]
    intensities = [f / b for _, f, b in points if b > 0] or [1.0]
    lo = min(min(intensities), min(h.ridge(dtype) for h in hws)) / 4
    hi = max(max(intensities), max(h.ridge(dtype) for h in hws)) * 4
    x = np.logspace(np.log10(lo), np.log10(hi), 200)
    for h in hws:
        ax.loglog(x, np.minimum(h.peak(dtype), x * h.mem_bw) / T, label=f"{h.name} roof")
    ref = hws[0]
    for label, f, b in points:
        i = f / b
        ax.scatter([i], [min(ref.peak(dtype), i * ref.mem_bw) / T], zorder=3)
        ax.annotate(label, (i, min(ref.peak(dtype), i * ref.mem_bw) / T),
                    textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel(f"attainable TFLOP/s ({dtype})")
    ax.legend(fontsize=8)
