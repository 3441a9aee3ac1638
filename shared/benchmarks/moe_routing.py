"""Mixture-of-experts routing: the measurements behind the lab, and `kclub bench moe-routing`.

On any machine: the grouped-matmul kernel's memory traffic counted in Triton's interpreter
against its formula, a per-expert loop and a capacity-padded batch; the roofline placement
that traffic implies on named GPUs. On this CPU: wall clock of the compiled paths a CPU runs —
GShard's one-hot einsum against sort + torch's grouped GEMM, and our layer against transformers'
Mixtral block with the same weights. On a CUDA machine: the Triton kernel against a per-expert
loop and torch's grouped GEMM, and the layers on the GPU.
"""

from __future__ import annotations

import importlib.util
import math
from functools import partial

import torch

from kernels.device import INTERPRET, gpu_available
from kernels.moe import Blocks, grouped_matmul, grouped_matmul_torch
from shared import bench, iocount, roofline
from shared.benchmarks import gpu_hardware, out_of_time, pct_of_roofline, record
from shared.moe import MoELayer, TopKRouter
from shared.moe.dispatch import capacity


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


@torch.no_grad()
def dispatch_throughput(experts_list, tokens: int, dim: int, ffn: int, k: int = 2,
                        capacity_factor: float = 1.25, repeat: int = 5) -> list[dict]:
    """Tokens/s of the whole layer forward on this CPU: one-hot einsum (capacity cf) against
    sort + torch's grouped GEMM (dropless), same weights and tokens, interleaved."""
    rows = []
    for E in experts_list:
        ours = layer(dim, ffn, E, k)
        gshard = layer(dim, ffn, E, k, "einsum", capacity_factor)
        gshard.load_state_dict(ours.state_dict())
        x = torch.randn(tokens, dim)
        t = bench.compare({"einsum": partial(gshard, x), "sort": partial(ours, x)},
                          repeat=repeat)
        rows.append({"experts": E, "capacity": capacity(tokens, k, E, capacity_factor),
                     **{name: tokens / tm.median_s for name, tm in t.items()}})
    return rows


@torch.no_grad()
def versus_mixtral(experts: int, tokens: int, dim: int, ffn: int, k: int = 2,
                   repeat: int = 10, device: str = "cpu", dtype=torch.float32) -> dict:
    """Same weights in our layer and transformers' MixtralSparseMoeBlock: the output error and
    tokens/s of each (theirs as a block built from a config runs: the per-expert loop; and
    their grouped_mm implementation, for reference), interleaved on the same tokens. On a GPU
    ours runs with both backends: the Triton kernel and torch's grouped_mm."""
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
    return {"experts": experts, "tokens": tokens, "rel_error": float(err),
            **{name: tokens / tm.median_s for name, tm in t.items()}}


def roofline_grouped(tokens: int, k: int, dim: int, ffn: int, experts: int, hw: str,
                     dtype: str = "bf16") -> roofline.Prediction:
    """The layer's two grouped GEMMs (gate_up: D->2F, down: F->D) at the counted minimum
    traffic, fp16/bf16 (2 bytes), on a named accelerator."""
    M = tokens * k
    flops = 2 * M * dim * 2 * ffn + 2 * M * ffn * dim
    bytes_moved = 2 * (M * dim + experts * dim * 2 * ffn + M * 2 * ffn      # gate_up
                       + M * ffn + experts * ffn * dim + M * dim)           # down
    return roofline.predict(flops, bytes_moved, hw, dtype)


def _per_expert_loop(x, w, sizes):
    return [xg @ w[g] for g, xg in enumerate(x.split(sizes.tolist()))]


def gpu_table(experts_list=(8, 64), tokens: int = 16384, dim: int = 2048,
              ffn: int = 1408) -> list[dict]:
    """On a CUDA GPU, bf16: the Triton grouped matmul against a per-expert loop of torch.mm and
    torch's grouped GEMM (F.grouped_mm, CUTLASS on sm90), TFLOP/s and % of the roofline at the
    minimum traffic (x, w and out once). Stops at the deadline."""
    hw, rows = gpu_hardware(), []
    for E in experts_list:
        if out_of_time(reserve_s=10):
            break
        sizes = routed_sizes(tokens, 2, E).cuda()
        M = int(sizes.sum())
        x = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, dim, ffn, device="cuda", dtype=torch.bfloat16)
        flops, nbytes = 2 * M * dim * ffn, 2 * (M * dim + E * dim * ffn + M * ffn)
        t = {"triton grouped": bench.measure(partial(grouped_matmul, x, w, sizes)),
             "per-expert loop": bench.measure(partial(_per_expert_loop, x, w, sizes)),
             "torch grouped_mm": bench.measure(partial(grouped_matmul_torch, x, w, sizes))}
        row = {"experts": E, "M": M, "K": dim, "N": ffn, "dtype": "bf16", "hardware": hw}
        for name, tm in t.items():
            row[f"{name} TFLOP/s"] = flops / tm.median_s / 1e12
            row[f"{name} % roofline"] = pct_of_roofline(tm.median_s, flops, nbytes, hw, "bf16")
        rows.append(record("grouped matmul (CUDA events)", row))
    return rows


def gpu_layers(experts_list=(8, 64), tokens: int = 16384, dim: int = 2048,
               ffn: int = 1408) -> list[dict]:
    """On a CUDA GPU, bf16: the whole layer forward, ours against transformers' Mixtral block
    with the same weights, tokens/s (wall clock, synchronised). Stops at the deadline."""
    rows = []
    for E in experts_list:
        if out_of_time(reserve_s=15):
            break
        rows.append(record("MoE layer forward vs Mixtral block, tokens/s (bf16)",
                           versus_mixtral(E, tokens, dim, ffn, repeat=5, device="cuda",
                                          dtype=torch.bfloat16)))
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
        for hw in ("H100 SXM", "A100 80GB"):
            p = roofline_grouped(16384, 2, 2048, 1408, 64, hw)
            record("layer GEMMs, roofline prediction (T=16384, E=64)",
                   {"hardware": hw, "us": p.time_s * 1e6, "bound": p.bound})
    if not gpu_available():
        torch.set_num_threads(1)   # a shared 2-core machine: one thread keeps timings steady
        for row in dispatch_throughput((4, 16, 64), 2048, 128, 256):
            record("layer forward tokens/s, CPU wall clock", row)
            if out_of_time():
                return 0
        for T in (64, 2048):
            for E in (8, 64):
                if out_of_time():
                    return 0
                record("ours vs Mixtral block, tokens/s, CPU", versus_mixtral(E, T, 128, 256))
    elif not INTERPRET:
        gpu_table()
        if importlib.util.find_spec("transformers") is None:
            print("note: transformers is not installed: no Mixtral block side by side")
        else:
            gpu_layers()
    return 0
