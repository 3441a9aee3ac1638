"""Online softmax: the measurements behind the lab, and `kclub bench online-softmax`.

On any machine: memory accesses per element counted in Triton's interpreter, and the roofline
prediction they imply on named GPUs, with the HBM bandwidth the compiled occupancy can sustain.
What the compiler made of the kernels (registers, occupancy, load widths) is read in
`shared.benchmarks.online_softmax_compiled`. On this CPU: compiled (XLA) wall clock of both
algorithms. On a CUDA machine: the Triton kernels timed against torch.softmax, per call and as
device time alone (CUDA graph replays), beside the prediction from counted bytes.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import torch

from kernels.device import INTERPRET, gpu_available
from kernels.softmax import safe_softmax, softmax, softmax_xla_online, softmax_xla_safe
from kernels.softmax.tiling import Tiling, choose, sm_count
from shared import bench, iocount, roofline
from shared.benchmarks import gpu_hardware, out_of_time, pct_of_roofline, record

# FLOPs per element, counted from the kernels: max (1), exp (1 as counted by roofline
# convention), add (1), divide (1); the online pass adds a compare and a rescale per tile only.
FLOPS_PER_ELEMENT = 4
# Accesses per element, as iocount counts them in the interpreter (tests pin these to the
# count): a row in one tile is read once and written once by both kernels; a row swept in
# tiles costs safe 4 (3 reads, 1 write) and online 3. The GPU table, where nothing is counted,
# predicts from these.
ACCESSES = {True: {"safe": 2, "online": 2}, False: {"safe": 4, "online": 3}}   # key: one tile


def previous_tiling(rows: int, cols: int) -> Tiling:
    """The launch rows in one tile had before kernels/softmax/tiling.py: 8192 elements per
    program on 4 warps, one program per block, no prefetch. At 4096 × 1024 it is [8, 1024] on
    512 programs, what the first GPU run (H200, 2026-11-27) timed at 181-273 GB/s; the GPU
    table times it again beside the new tiling, in the same run, as the baseline."""
    block_n = min(1 << (cols - 1).bit_length(), 4096)
    block_m = max(1, min(1 << (rows - 1).bit_length(), 8192 // block_n))
    return Tiling(block_m, block_n, 4, 1, -(-rows // block_m))


def accesses_per_element(rows: int, cols: int, block: int | None, dtype=torch.float32) -> dict:
    """Counted global-memory accesses per element for both kernels at one row length (block
    None: the tile the launcher picks, as on a GPU)."""
    x = torch.randn(rows, cols, dtype=dtype)
    out = {"cols": cols, "block": block, "element_size": x.element_size()}
    for name, fn in (("safe", safe_softmax), ("online", softmax)):
        with iocount.count() as c:
            fn(x, block_size=block)
        out[name] = c.bytes_total / (x.numel() * x.element_size())
        out[f"{name}_bytes"] = c.bytes_total
    return out


def predicted_speedup(hw: str, rows: int, cols: int, counted: dict,
                      compiled: dict | None = None) -> dict:
    """Roofline time of safe and online softmax on a rows × cols input, and their ratio, from
    the bytes `accesses_per_element` counted at this row length (same dtype, any number of
    rows: accesses per element do not depend on it).

    `compiled` (kernel name -> {"occupancy", "bytes_in_flight_per_warp"}, from
    online_softmax_compiled.occupancy_inputs) caps each kernel's bandwidth at what its compiled
    occupancy sustains by Little's law; without it the datasheet HBM bandwidth is used."""
    if counted["cols"] != cols:
        raise ValueError(f"counted must be taken at cols={cols}, got cols={counted['cols']}")
    n = rows * cols
    dtype = {2: "fp16", 4: "fp32"}[counted["element_size"]]
    out = {"hardware": hw, "rows": rows, "cols": cols}
    for name, kernel in (("safe", "softmax_safe_kernel"), ("online", "softmax_online_kernel")):
        part = roofline.hardware(hw)
        if compiled is not None:
            c = compiled[kernel]
            bw = roofline.occupancy_bandwidth(part, c["occupancy"], c["bytes_in_flight_per_warp"])
            part = replace(part, mem_bw=bw)
            out[f"{name}_bw"] = bw
        nbytes = counted[name] * n * counted["element_size"]
        p = roofline.predict(FLOPS_PER_ELEMENT * n, nbytes, part, dtype)
        out[f"{name}_s"], out[f"{name}_bytes"], out["bound"] = p.time_s, nbytes, p.bound
    out["speedup"] = out["safe_s"] / out["online_s"]
    return out


def predicted_minimal_gbps(hw: str, one_tile: bool) -> dict:
    """Roofline prediction from the counted accesses: the GB/s of *minimal* traffic (one read,
    one write per element) each kernel shows when it moves its counted bytes at the datasheet
    HBM bandwidth, mem_bw × 2 / accesses. Rows in one tile: both at mem_bw, as torch.softmax
    can be; swept rows: safe at half, online at two thirds."""
    bw = roofline.hardware(hw).mem_bw
    return {name: bw * 2 / a / 1e9 for name, a in ACCESSES[one_tile].items()}


def _cpu():
    return jax.devices("cpu")[0]


def cpu_wallclock(rows: int, cols: int, repeat: int = 5) -> dict[str, bench.Timing]:
    """Compiled code on this CPU (JAX's CPU device, whatever the default backend): both
    algorithms in XLA, XLA's own softmax, torch's, and a copy (1 read + 1 write: the floor any
    softmax must pay)."""
    x = jax.device_put(jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32), _cpu())
    xt = torch.from_numpy(jax.device_get(x).copy())
    double = jax.jit(lambda v: v * 2.0)
    return bench.compare({
        "online (XLA, ⊕-reduce)": lambda: softmax_xla_online(x),
        "safe (XLA, 3 sweeps)": lambda: softmax_xla_safe(x),
        "jax.nn.softmax": lambda: jax.nn.softmax(x),
        "torch.softmax": lambda: torch.softmax(xt, -1),
        "copy floor (x·2)": lambda: double(x),
    }, repeat=repeat)


def compiled_fusions(fn, rows: int, cols: int) -> list[str]:
    """The fusions XLA:CPU compiles `fn` into, one line each: what runs as a library kernel
    (YNNPACK's `__ynn_fusion`) and what as a generated loop (kLoop). Compiled for JAX's CPU
    device on any host: XLA:GPU fuses and names them otherwise."""
    x = jax.ShapeDtypeStruct((rows, cols), jnp.float32,
                             sharding=jax.sharding.SingleDeviceSharding(_cpu()))
    hlo = fn.lower(x).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    lines = []
    for line in entry.splitlines()[1:]:
        if " fusion(" not in line:
            continue
        name = line.split("=")[0].strip().lstrip("%").removeprefix("ROOT ").lstrip("%")
        kind = line.split("kind=")[1].split(",")[0]
        lib = " (YNNPACK)" if "__ynn_fusion" in line else ""
        op = line.split('op_name="')[1].split('"')[0].split("/")[-1] if "op_name" in line else ""
        lines.append(f"{name:28s} {kind}{lib:10s} {op}")
    return lines


def _tiling_label(t: Tiling) -> str:
    return f"{t.block_m}×{t.block_n} w{t.num_warps} s{t.num_stages} p{t.programs}"


def gpu_table(rows: int = 4096, cols_list=(1024, 4096, 16384, 65536),
              repeat: int = 30) -> list[dict]:
    """On a CUDA GPU, fp16: each softmax's GB/s of *minimal* traffic (one read, one write) and
    its % of the HBM roofline on that traffic, with the launcher's own tiling (rows of up to
    4096 columns in one tile, longer rows swept in tiles of 1024), beside the GB/s predicted from
    the counted accesses. Two timings, interleaved round by round (bench.compare): per call
    (CUDA events around each call, L2 flushed before it: what a caller sees, Python launch
    included where it outlasts the flush) and device time alone (the same calls replayed from a
    CUDA graph). Rows in one tile also time `previous_tiling`. The shapes are the first GPU
    run's; each new launch compiles once (8 in all), so the rows fit the gpu-check budget.
    Stops at the deadline."""
    hw = gpu_hardware()
    sms = sm_count(torch.device("cuda"))
    bench.spin_up()
    out = []
    for cols in cols_list:
        if out_of_time(reserve_s=5):
            break
        x = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
        t = choose(rows, cols, x.element_size(), None, sms)
        one_tile = cols <= t.block_n
        fns = {"online": lambda x=x: softmax(x), "safe": lambda x=x: safe_softmax(x),
               "torch.softmax": lambda x=x: torch.softmax(x, -1)}
        if one_tile:
            before = previous_tiling(rows, cols)
            fns["online, previous tiling"] = lambda x=x, p=before: softmax(x, tiling=p)
        per_call = bench.compare(fns, warmup=3, repeat=repeat)
        device = bench.compare({k: bench.graphed(f) for k, f in fns.items()}, warmup=3,
                               repeat=repeat)
        nbytes = 2 * x.numel() * x.element_size()
        flops = FLOPS_PER_ELEMENT * x.numel()
        row = {"rows": rows, "cols": cols, "dtype": "fp16", "hardware": hw,
               "tiling": _tiling_label(t), "one tile": one_tile}
        if hw is not None:
            for name, gbps in predicted_minimal_gbps(hw, one_tile).items():
                row[f"{name} predicted GB/s"] = gbps
        for name, timing in per_call.items():
            row[f"{name} GB/s"] = nbytes / timing.median_s / 1e9
            row[f"{name} % roofline"] = pct_of_roofline(timing.median_s, flops, nbytes, hw,
                                                        "fp16")
        for name, timing in device.items():
            row[f"{name} GB/s, graph"] = nbytes / timing.median_s / 1e9
        r = bench.ratio(device["safe"], device["online"])
        row["online speed-up over safe, graph"] = r.median
        row["interval"] = f"[{r.low:.3g}, {r.high:.3g}]"
        out.append(record("softmax bandwidth (CUDA events)", row))
    return out


def main() -> int:
    if INTERPRET:
        for cols in (1024, 4096, 16384):
            a = accesses_per_element(8, cols, 256)
            record("accesses per element (counted, Triton interpreter)",
                   {"cols": cols, "safe": a["safe"], "online": a["online"]})
        for cols in (1024, 32768):   # one tile per row, and rows swept in tiles
            counted = accesses_per_element(4, cols, None, torch.float16)
            for hw in ("H100 SXM", "H200", "A100 80GB", "TPU v5e"):
                p = predicted_speedup(hw, 4096, cols, counted)
                record("predicted speed-up online over safe (roofline from counted bytes)",
                       {"hardware": hw, "cols": cols, "speedup": p["speedup"],
                        "online minimal-traffic GB/s":
                            2 * 4096 * cols * 2 / p["online_s"] / 1e9, "bound": p["bound"]})
        if out_of_time():
            return 0
        for name, t in cpu_wallclock(2048, 8192).items():
            record("CPU wall clock, 2048 x 8192 fp32", {"impl": name, "median ms":
                                                        t.median_s * 1e3, "timing": t.method})
    if gpu_available() and not INTERPRET:
        print("GB/s of minimal traffic (fp16, 4096 rows): per call and CUDA-graph replays")
        gpu_table()
    return 0
