"""Mixture-of-experts routing: the measurements behind the lab, and `kclub bench moe-routing`.

On any machine: the grouped-matmul kernel's memory traffic counted in Triton's interpreter
against its formula, a per-expert loop and a capacity-padded batch; the device ops and host
syncs around its one Triton launch; the roofline placement on named GPUs, with the occupancy
the compiler reports. On this CPU: wall clock of the paths a CPU runs — GShard's one-hot einsum,
Tutel's index dispatch at the same capacity, sort + torch's grouped GEMM with that capacity and
dropless — and our layer against transformers' Mixtral block with the same weights. On a CUDA
machine: the Triton kernel against a per-expert loop and torch's grouped GEMM, and the layers.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import partial

import torch

from kernels.device import INTERPRET, gpu_available
from kernels.moe import Blocks, grouped_matmul, grouped_matmul_torch
from kernels.moe.grouped_matmul import default_blocks
from shared import bench, iocount, roofline
from shared.benchmarks import gpu_hardware, out_of_time, pct_of_roofline, record
from shared.check import assert_close
from shared.moe import MoELayer, TopKRouter
from shared.moe.dispatch import capacity


@dataclass(frozen=True)
class ExpertShape:
    """An expert layer's sizes: model dim D, expert FFN width F, routed experts E, top-k."""
    name: str
    dim: int
    ffn: int
    experts: int
    k: int


# Routed experts only (both models also run shared experts, not modelled here); from the
# models' config.json: hidden_size, moe_intermediate_size, n_routed_experts, num_experts_per_tok.
V2_LITE = ExpertShape("DeepSeek-V2-Lite", 2048, 1408, 64, 6)
V3 = ExpertShape("DeepSeek-V3", 7168, 2048, 256, 8)


def routed_sizes(tokens: int, k: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Group sizes of T·k assignments routed at random (a near-uniform router at init)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen)
    return torch.bincount(scores.topk(k, dim=-1).indices.reshape(-1), minlength=experts)


def gmm_bytes_formula(sizes: list[int], K: int, N: int, blocks: Blocks, itemsize: int) -> int:
    """Bytes the one-launch kernel must move: x once per N-tile, w[g] once per row tile of g,
    the output once, and 3 int32 schedule entries per program (tiles × N-tiles)."""
    M = sum(sizes)
    n_tiles = math.ceil(N / blocks.n)
    row_tiles = sum(math.ceil(s / blocks.m) for s in sizes)
    programs = (math.ceil(M / blocks.m) + len(sizes)) * n_tiles
    return itemsize * (M * K * n_tiles + row_tiles * K * N + M * N) + 12 * programs


def gmm_traffic(sizes: torch.Tensor, K: int, N: int, capacity_rows: int,
                blocks: Blocks | None = None, dtype=torch.float16) -> dict:
    """Counted traffic (iocount) of one grouped launch, a per-expert loop, and a batch padded
    to `capacity_rows` per expert (GShard), with the same kernel and tiles."""
    blocks = blocks or Blocks()
    E, M = len(sizes), int(sizes.sum())
    x, w = torch.randn(M, K, dtype=dtype), torch.randn(E, K, N, dtype=dtype)
    out = {}
    with iocount.count() as c:
        grouped_matmul(x, w, sizes, blocks=blocks)
    out["grouped"] = c
    with iocount.count() as c:
        start = 0
        for g, s in enumerate(sizes.tolist()):
            if s:   # a loop launches one GEMM per expert that has tokens
                grouped_matmul(x[start:start + s], w[g:g + 1], sizes[g:g + 1], blocks=blocks)
            start += s
    out["per-expert loop"] = c
    padded = torch.full((E,), capacity_rows)
    with iocount.count() as c:
        grouped_matmul(torch.randn(E * capacity_rows, K, dtype=dtype), w, padded, blocks=blocks)
    out["padded to capacity"] = c
    out["formula"] = gmm_bytes_formula(sizes.tolist(), K, N, blocks, x.element_size())
    out["minimum"] = x.element_size() * (M * K + E * K * N + M * N)
    return out


def layer(dim: int, ffn: int, experts: int, k: int = 2, dispatch: str = "sort",
          capacity_factor: float | None = None, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(dim, ffn, TopKRouter(dim, experts, k), dispatch=dispatch,
                    capacity_factor=capacity_factor, init_std=dim ** -0.5).eval()


# Every layer of dispatch_throughput, with its capacity factor (None: dropless).
DISPATCHES = {"einsum": ("einsum", 1.25), "index": ("index", 1.25), "sort": ("sort", 1.25),
              "sort, dropless": ("sort", None)}


@torch.no_grad()
def dispatch_throughput(experts_list, tokens: int, dim: int, ffn: int, k: int = 2,
                        repeat: int = 5) -> list[dict]:
    """The whole layer forward on this CPU for each dispatch in DISPATCHES, same weights and
    tokens, interleaved rounds: per E, the Timings (`bench.ratio` pairs them) and what each
    computes — the expert rows (E·C when padded, the kept assignments when sorted) and the
    share of assignments dropped."""
    rows = []
    for E in experts_list:
        base = layer(dim, ffn, E, k)
        layers = {}
        for name, (dispatch, cf) in DISPATCHES.items():
            layers[name] = layer(dim, ffn, E, k, dispatch, cf)
            layers[name].load_state_dict(base.state_dict())
        x = torch.randn(tokens, dim)
        timings = bench.compare({n: partial(m, x) for n, m in layers.items()}, repeat=repeat)
        cap = capacity(tokens, k, E, 1.25)
        kept = round((1 - layers["sort"].last_dropped) * tokens * k)
        rows.append({"experts": E, "capacity": cap, "timings": timings,
                     "expert rows": {"einsum": E * cap, "index": E * cap, "sort": kept,
                                     "sort, dropless": tokens * k},
                     "dropped": layers["index"].last_dropped})
    return rows


@torch.no_grad()
def versus_mixtral(experts: int, tokens: int, dim: int, ffn: int, k: int = 2,
                   repeat: int = 10, device: str = "cpu", dtype=torch.float32) -> dict:
    """Same weights in our layer and transformers' MixtralSparseMoeBlock: the output error and
    the Timings of each (theirs as a block built from a config runs: the per-expert loop; and
    their grouped_mm implementation), interleaved on the same tokens. On a GPU ours also runs
    with the Triton backend."""
    from shared.moe.hf_mixtral import mixtral_block  # transformers: only here

    ours = layer(dim, ffn, experts, k).to(device, dtype)
    theirs = mixtral_block(ours).to(device)
    theirs_gmm = mixtral_block(ours, "grouped_mm").to(device)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype)
    ref = theirs(x).double()
    err = (ours(x).double() - ref).norm() / ref.norm()
    fns = {"ours": lambda: ours(x), "Mixtral block": lambda: theirs(x),
           "Mixtral block (grouped_mm)": lambda: theirs_gmm(x)}
    if device != "cpu":
        triton_layer = layer(dim, ffn, experts, k).to(device, dtype)
        triton_layer.load_state_dict(ours.state_dict())
        triton_layer.backend = "triton"
        fns["ours (triton)"] = lambda: triton_layer(x)
    t = bench.compare(fns, repeat=repeat)
    return {"experts": experts, "tokens": tokens, "rel_error": float(err), "timings": t}


def tokens_per_s(row: dict) -> dict[str, float]:
    """{contender: tokens/s at its median} for a row of versus_mixtral."""
    return {n: row["tokens"] / tm.median_s for n, tm in row["timings"].items()}


def expert_gemm_work(tokens: int, shape: ExpertShape, traffic: str = "compulsory",
                     blocks: Blocks | None = None, itemsize: int = 2) -> tuple[int, int]:
    """(FLOPs, bytes) of the layer's two grouped GEMMs (gate_up D->2F, down F->D) over the
    tokens·k routed rows, spread evenly. traffic "compulsory": x, w and out once (perfect
    on-chip reuse); "tiles": what the Triton kernel's tiles read if nothing stays in L2 — x
    once per N-tile, w[g] once per row-tile of g (gmm_bytes_formula)."""
    if traffic not in ("compulsory", "tiles"):
        raise ValueError(f"traffic must be 'compulsory' or 'tiles', got {traffic!r}")
    M, E, D, F = tokens * shape.k, shape.experts, shape.dim, shape.ffn
    flops = 2 * M * D * 2 * F + 2 * M * F * D
    if traffic == "compulsory":
        return flops, itemsize * (M * D + E * D * 2 * F + M * 2 * F + M * F + E * F * D + M * D)
    sizes = [M // E + (g < M % E) for g in range(E)]
    blocks = blocks or Blocks()
    return flops, (gmm_bytes_formula(sizes, D, 2 * F, blocks, itemsize)
                   + gmm_bytes_formula(sizes, F, D, blocks, itemsize))


def roofline_grouped(tokens: int, shape: ExpertShape, hw: str, dtype: str = "bf16",
                     traffic: str = "compulsory", occupancy: float | None = None,
                     bytes_in_flight_per_warp: float | None = None) -> roofline.Prediction:
    """The two grouped GEMMs on a named accelerator, 16-bit. With an occupancy (and the bytes
    each warp keeps in flight), the memory side runs at the bandwidth Little's law allows at
    that occupancy (roofline.occupancy_bandwidth) instead of the datasheet's."""
    flops, nbytes = expert_gemm_work(tokens, shape, traffic)
    p = roofline.predict(flops, nbytes, hw, dtype)
    if occupancy is None:
        return p
    bw = roofline.occupancy_bandwidth(hw, occupancy, bytes_in_flight_per_warp)
    memory = nbytes / bw
    return roofline.Prediction(max(p.compute_s, memory), p.compute_s, memory,
                               "compute" if p.compute_s >= memory else "memory", p.intensity,
                               p.hardware, dtype, flops)


def per_expert_loop(x, w, sizes):
    """The baseline a grouped matmul replaces: one torch.mm per expert (one host read of the
    sizes to split the rows)."""
    return [xg @ w[g] for g, xg in enumerate(x.split(sizes.tolist()))]


# What the GPU benchmark runs: V2-Lite's experts, and the same dims with Mixtral's E=8, top-2.
GPU_SHAPES = (ExpertShape("E=8 top-2 at V2-Lite dims", 2048, 1408, 8, 2), V2_LITE)


# The tiles before `default_blocks` (the first H200 run's 102-117 TFLOP/s): 64 × 64 × 32 on 4
# warps, programs in row-tile-fastest order (one group holding every row tile, as the old 2-D
# grid ran them: GPU_SHAPES have at most 1600 row tiles of 64).
PREVIOUS_BLOCKS = Blocks(m=64, n=64, k=32, group_m=2**16, warps=4, stages=3)


def gpu_table(shapes=GPU_SHAPES, tokens: int = 16384) -> list[dict]:
    """On a CUDA GPU, bf16: the Triton grouped matmul (the gate_up-sized GEMM, D -> F) with the
    target's tiles (`default_blocks`) and with PREVIOUS_BLOCKS, against a per-expert loop of
    torch.mm and torch's grouped GEMM (F.grouped_mm, CUTLASS on sm90), TFLOP/s and % of the
    roofline at the minimum traffic (x, w and out once); the Triton result's error against the
    per-expert loop in fp32 first. Stops at the deadline."""
    hw, rows = gpu_hardware(), []
    for shape in shapes:
        if out_of_time(reserve_s=10):
            break
        E, dim, ffn = shape.experts, shape.dim, shape.ffn
        sizes = routed_sizes(tokens, shape.k, E).cuda()
        M = int(sizes.sum())
        x = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, dim, ffn, device="cuda", dtype=torch.bfloat16)
        blocks = default_blocks(x.dtype)
        ref = torch.cat(per_expert_loop(x.float(), w.float(), sizes))
        err = assert_close(grouped_matmul(x, w, sizes), ref, dtype=torch.bfloat16,
                           what=f"grouped_matmul {shape.name}")
        flops, nbytes = 2 * M * dim * ffn, 2 * (M * dim + E * dim * ffn + M * ffn)
        t = {"triton grouped": bench.measure(partial(grouped_matmul, x, w, sizes)),
             "triton, previous tiles": bench.measure(partial(grouped_matmul, x, w, sizes,
                                                             blocks=PREVIOUS_BLOCKS)),
             "per-expert loop": bench.measure(partial(per_expert_loop, x, w, sizes)),
             "torch grouped_mm": bench.measure(partial(grouped_matmul_torch, x, w, sizes))}
        row = {"shape": shape.name, "experts": E, "k": shape.k, "M": M, "K": dim, "N": ffn,
               "dtype": "bf16", "hardware": hw, "tiles": f"{blocks.m}x{blocks.n}x{blocks.k} "
               f"w{blocks.warps} s{blocks.stages} g{blocks.group_m}", "rel err vs fp32": err}
        for name, tm in t.items():
            row[f"{name} TFLOP/s"] = flops / tm.median_s / 1e12
            row[f"{name} % roofline"] = pct_of_roofline(tm.median_s, flops, nbytes, hw, "bf16")
        rows.append(record("grouped matmul (CUDA events)", row))
    return rows


def _mixtral_row(r: dict) -> dict:
    """A versus_mixtral result as a flat row: tokens/s per contender and ours / theirs."""
    t = r["timings"]
    return {"experts": r["experts"], "tokens": r["tokens"], "rel_error": r["rel_error"],
            **{f"{n} tok/s": v for n, v in tokens_per_s(r).items()},
            "ours / Mixtral block": str(bench.ratio(t["Mixtral block"], t["ours"]))}


def gpu_layers(shapes=GPU_SHAPES, tokens: int = 16384) -> list[dict]:
    """On a CUDA GPU, bf16: the whole layer forward, ours against transformers' Mixtral block
    with the same weights, tokens/s (wall clock, synchronised). Stops at the deadline."""
    rows = []
    for shape in shapes:
        if out_of_time(reserve_s=15):
            break
        r = versus_mixtral(shape.experts, tokens, shape.dim, shape.ffn, shape.k, repeat=5,
                           device="cuda", dtype=torch.bfloat16)
        rows.append(record("MoE layer forward vs Mixtral block, tokens/s (bf16)",
                           _mixtral_row(r)))
    return rows


def main() -> int:
    if INTERPRET:
        sizes = routed_sizes(512, 2, 8)
        traffic = gmm_traffic(sizes, 64, 128, capacity(512, 2, 8, 1.25))
        for name in ("grouped", "per-expert loop", "padded to capacity"):
            c = traffic[name]
            record("grouped-matmul traffic, counted (T=512, k=2, E=8)",
                   {"impl": name, "bytes": c.bytes_total, "launches": c.launches,
                    "formula": traffic["formula"], "minimum": traffic["minimum"]})
        for shape in (V2_LITE, V3):
            for hw in ("H100 SXM", "A100 80GB"):
                p = roofline_grouped(16384, shape, hw)
                record("expert GEMMs, roofline prediction at compulsory traffic (T=16384)",
                       {"shape": shape.name, "hardware": hw, "us": p.time_s * 1e6,
                        "bound": p.bound})
    if not gpu_available():
        torch.set_num_threads(1)   # a shared 2-core machine: one thread keeps timings steady
        for row in dispatch_throughput((4, 16, 64), 2048, 128, 256):
            t = row["timings"]
            record("layer forward, CPU wall clock (cf 1.25 unless dropless)",
                   {"experts": row["experts"], "capacity": row["capacity"],
                    **{f"{n} tok/s": 2048 / tm.median_s for n, tm in t.items()},
                    "index / einsum": str(bench.ratio(t["einsum"], t["index"])),
                    "sort / index": str(bench.ratio(t["index"], t["sort"]))})
            if out_of_time():
                return 0
        for T in (64, 2048):
            for E in (8, 64):
                if out_of_time():
                    return 0
                record("ours vs Mixtral block, tokens/s, CPU",
                       _mixtral_row(versus_mixtral(E, T, 128, 256)))
    elif not INTERPRET:
        gpu_table()
        if importlib.util.find_spec("transformers") is None:
            print("note: transformers is not installed: no Mixtral block side by side")
        else:
            gpu_layers()
    return 0
