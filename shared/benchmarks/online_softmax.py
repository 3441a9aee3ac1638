"""Online softmax: the measurements behind the lab, and `kclub bench online-softmax`.

On any machine: memory accesses per element counted in Triton's interpreter, and the roofline
prediction they imply on named GPUs, with the HBM bandwidth the compiled occupancy can sustain.
What the compiler made of the kernels (registers, occupancy, load widths) is read in
`shared.benchmarks.online_softmax_compiled`. On this CPU: compiled (XLA) wall clock of both
algorithms. On a CUDA machine: the Triton kernels timed against torch.softmax.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import torch

from kernels.device import INTERPRET, gpu_available
from kernels.softmax import safe_softmax, softmax, softmax_xla_online, softmax_xla_safe
from shared import bench, iocount, roofline
from shared.benchmarks import gpu_hardware, out_of_time, pct_of_roofline, record

# FLOPs per element, counted from the kernels: max (1), exp (1 as counted by roofline
# convention), add (1), divide (1); the online pass adds a compare and a rescale per tile only.
FLOPS_PER_ELEMENT = 4


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


def cpu_wallclock(rows: int, cols: int, repeat: int = 5) -> dict[str, bench.Timing]:
    """Compiled code on this CPU: both algorithms in XLA, XLA's own softmax, torch's, and a
    copy (1 read + 1 write: the floor any softmax must pay)."""
    x = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
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
    """The fusions XLA compiles `fn` into on this backend, one line each: what runs as a
    library kernel (YNNPACK's `__ynn_fusion` on CPU) and what as a generated loop (kLoop)."""
    x = jax.ShapeDtypeStruct((rows, cols), jnp.float32)
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


def gpu_table(rows: int = 4096, cols_list=(1024, 4096, 16384, 65536)) -> list[dict]:
    """On a CUDA GPU: effective bandwidth of each softmax and its % of the HBM roofline, both
    counted on the *minimal* traffic (one read, one write, fp16), with a tile of 1024 so long
    rows take the multi-tile path; torch.softmax (one fused kernel) beside them. On minimal
    traffic a kernel at the HBM roof reads 2/accesses of it: safe (4) at most 50%, online (3)
    at most 67%, a one-read kernel 100%. Stops at the deadline."""
    hw = gpu_hardware()
    out = []
    for cols in cols_list:
        if out_of_time(reserve_s=5):
            break
        x = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
        nbytes = 2 * x.numel() * x.element_size()
        flops = FLOPS_PER_ELEMENT * x.numel()
        timings = {
            "online": bench.measure(lambda x=x: softmax(x, block_size=1024)),
            "safe": bench.measure(lambda x=x: safe_softmax(x, block_size=1024)),
            "torch.softmax": bench.measure(lambda x=x: torch.softmax(x, -1)),
        }
        row = {"rows": rows, "cols": cols, "dtype": "fp16", "hardware": hw}
        for name, t in timings.items():
            row[f"{name} GB/s"] = nbytes / t.median_s / 1e9
            row[f"{name} % roofline"] = pct_of_roofline(t.median_s, flops, nbytes, hw, "fp16")
        out.append(record("softmax bandwidth (CUDA events)", row))
    return out


def main() -> int:
    if INTERPRET:
        for cols in (1024, 4096, 16384):
            a = accesses_per_element(8, cols, 256)
            record("accesses per element (counted, Triton interpreter)",
                   {"cols": cols, "safe": a["safe"], "online": a["online"]})
        counted = accesses_per_element(4, 32768, None, torch.float16)
        for hw in ("H100 SXM", "A100 80GB", "TPU v5e"):
            p = predicted_speedup(hw, 4096, 32768, counted)
            record("predicted speed-up online over safe (roofline from counted bytes)",
                   {"hardware": hw, "speedup": p["speedup"], "bound": p["bound"]})
        if out_of_time():
            return 0
        for name, t in cpu_wallclock(2048, 8192).items():
            record("CPU wall clock, 2048 x 8192 fp32", {"impl": name, "median ms":
                                                        t.median_s * 1e3, "timing": t.method})
    if gpu_available() and not INTERPRET:
        print("GB/s of minimal traffic (fp16, 4096 rows), CUDA events via do_bench")
        gpu_table()
    return 0
