"""The mega-kernel lab's measurements: launches counted, simulated H100 step latencies
(predictions), their ablations, and the figures (one layer's task graph, per-SM Gantt charts).

Counted: launches per decode step of the kernel-per-operator path (the runtime's counter) and
the kernels torch eager runs for the same step (torch.profiler's CPU op events that are kernels:
on a GPU each is one launch). Predicted: shared.megakernel.simulate on a Qwen3-8B-like model.
The GPU timings (persistent with many workers vs per-operator vs eager) live in
shared/benchmarks/megakernel_gpu.py, which `make gpu-check` runs.
"""

from __future__ import annotations

import torch

from shared.benchmarks import out_of_time, record
from shared.megakernel import simulate as sim
from shared.megakernel.graph import build_decode_graph, operators
from shared.models.llama import Llama, LlamaConfig

# Qwen3-8B's shape (hf config): 36 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 12288,
# vocabulary 151 936. Qwen3's q/k RMSNorm is not modelled (two tiny ops per layer).
QWEN3_8B = LlamaConfig(vocab_size=151_936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8,
                       ffn_dim=12_288, max_seq_len=40_960, rope_theta=1e6, norm_eps=1e-6)
PAPER_SPEEDUP = 1.7   # MPK: "up to 1.7×" end-to-end decoding latency over kernel-per-operator
SIM_TILE = 64         # output columns per matmul task in the simulated graph
H100 = sim.GPUModel()  # H100 SXM, bf16, the assumed launch / event / dispatch costs


def eager_kernels_per_step(model: Llama, batch: int = 1, context: int = 16) -> int:
    """Kernels torch eager runs for one decode step: aten ops that compute (views, reshapes and
    allocation do not launch on a GPU), counted by torch.profiler on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    from shared.inference.kv_cache import KVCache

    cache = KVCache(model.config, batch, max_len=context + 1)
    cache.lengths += context
    tok = torch.zeros(batch, 1, dtype=torch.long)
    model(tok, cache=cache)   # warm-up
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(tok, cache=cache)
    # A kernel is an op that reaches the dispatcher's leaves: count events without CPU children
    # that touch data (the leaf ops below composite ones such as linear -> mm).
    leaves = [e for e in prof.events() if not e.cpu_children and e.name.startswith("aten::")]
    skip = {"aten::view", "aten::reshape", "aten::expand", "aten::transpose", "aten::unsqueeze",
            "aten::slice", "aten::select", "aten::t", "aten::empty", "aten::as_strided",
            "aten::alias", "aten::_unsafe_view", "aten::detach", "aten::empty_strided",
            "aten::squeeze", "aten::permute", "aten::resolve_conj", "aten::resolve_neg",
            "aten::lift_fresh", "aten::empty_like", "aten::unbind", "aten::split",
            "aten::chunk", "aten::result_type", "aten::_reshape_alias", "aten::narrow",
            "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}
    return sum(e.name not in skip for e in leaves)


def predicted(batch: int, seq_len: int, gpu: sim.GPUModel = H100,
              config: LlamaConfig = QWEN3_8B) -> dict:
    """Simulated step latencies (predictions) and the ablations, for one (batch, context)."""
    g = build_decode_graph(config, batch, tile=SIM_TILE, seq_len=seq_len)
    per_op = sim.per_operator(g, gpu)
    no_launch = sim.per_operator(g, sim.GPUModel(gpu.hw, gpu.dtype, launch_s=0.0,
                                                 event_s=gpu.event_s,
                                                 dispatch_s=gpu.dispatch_s))
    mega = sim.persistent(g, gpu)
    gain = per_op.total_s - mega.total_s
    launch_part = per_op.total_s - no_launch.total_s
    return {"batch": batch, "seq_len": seq_len, "tasks": len(g["tasks"]),
            "launches": per_op.launches, "per_op_ms": per_op.total_s * 1e3,
            "per_op_no_launch_ms": no_launch.total_s * 1e3, "persistent_ms": mega.total_s * 1e3,
            "speedup": per_op.total_s / mega.total_s,
            "launch_only_speedup": per_op.total_s / no_launch.total_s,
            "overlap_only_speedup": no_launch.total_s / mega.total_s,
            "launch_share": launch_part / gain if gain > 0 else float("nan"),
            "busy_per_op": per_op.busy_fraction(gpu.sms),
            "busy_persistent": mega.busy_fraction(gpu.sms), "runs": (per_op, mega)}


def gantt(ax, run: sim.Run, graph: dict, sms: int, title: str, until_s: float | None = None):
    """One row per SM (the first `sms`), one bar per task, coloured by op."""
    colours = {"embed": "C7", "rmsnorm": "C0", "matmul": "C1", "swiglu": "C2", "rope": "C3",
               "attention": "C4", "add": "C5", "argmax": "C6"}
    for sm, t, s, e in run.spans:
        if sm < sms and (until_s is None or s < until_s):
            op = graph["tasks"][t]["op"]
            ax.barh(sm, (e - s) * 1e6, left=s * 1e6, color=colours[op], height=0.8)
    for op, c in colours.items():
        ax.barh(-10, 0, color=c, label=op)
    ax.set_ylim(-0.5, sms - 0.5)
    ax.set_xlabel("µs (predicted)")
    ax.set_ylabel("SM")
    ax.set_title(title)
    if until_s:
        ax.set_xlim(0, until_s * 1e6)
    ax.legend(fontsize=7, ncol=4, loc="upper right")


def draw_layer(ax, graph: dict, layer: int = 0) -> None:
    """One layer's tasks as columns by operator, with an arrow per producer → consumer pair."""
    ops = [g for g in operators(graph) if graph["tasks"][g[0]]["layer"] == layer]
    pos = {}
    for x, group in enumerate(ops):
        for y, t in enumerate(group):
            pos[t] = (x, y - (len(group) - 1) / 2)
        ax.annotate(graph["tasks"][group[0]]["op"], (x, (len(group) + 1) / 2), ha="center",
                    fontsize=8)
    producers: dict[int, list[int]] = {}
    for t in graph["tasks"]:
        for e in t["triggers"]:
            producers.setdefault(e, []).append(t["id"])
    for t in pos:
        for e in graph["tasks"][t]["waits"]:
            for p in producers.get(e, []):
                if p in pos:
                    (x0, y0), (x1, y1) = pos[p], pos[t]
                    ax.plot([x0, x1], [y0, y1], color="0.6", lw=0.6, zorder=1)
    xs, ys = zip(*pos.values(), strict=True)
    ax.scatter(xs, ys, s=40, zorder=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"layer {layer}: {len(pos)} tasks, {len(ops)} operators")


def main() -> int:
    from shared.models.zoo import load

    model = load("target")
    record("kernels per decode step, tiny Llama (counted)",
           {"torch eager (profiler)": eager_kernels_per_step(model),
            "kernel-per-operator path": len(operators(build_decode_graph(model.config, 1))),
            "mega-kernel": 1})
    for batch in (1, 8, 16):
        for seq in (512, 4096, 16384):
            if out_of_time(reserve_s=30):
                return 0
            p = predicted(batch, seq)
            record("Qwen3-8B-like decode step on H100 (prediction)",
                   {k: v for k, v in p.items() if k != "runs"})
    return 0
