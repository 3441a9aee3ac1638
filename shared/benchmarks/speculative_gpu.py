"""Speculative decoding on a GPU, predicted from this CPU: what the sampling kernels move and
what the compiler made of them.

- `kernel_traffic`: the bytes `speculative_accept` and `gumbel_sample` move at Llama 2's
  vocabulary, counted in Triton's interpreter, beside the analytic count.
- `compiled_table`: the rows of `kclub compile --family sampling` (shared.compile_report
  .compiled) as one line per kernel, case and target, block sizes named.
- `accept_prediction`: the accept kernel's time on a named GPU. The kernel runs one program
  (CTA) per sequence and does not pipeline its loads (no cp.async), so the bandwidth it can
  draw is set by Little's law: resident warps × bytes each keeps in flight / HBM latency
  (roofline.occupancy_bandwidth). Resident warps are B × num_warps until the batch fills the
  GPU, and only past that point does the compiled occupancy (registers) cap them.
- `memory_bound_c`: the paper's c for a decode step that costs its weight bytes.
"""

from __future__ import annotations

import torch

from kernels.device import INTERPRET
from kernels.sampling import gumbel_sample, speculative_accept
from shared import iocount, roofline

TARGET_GPU = {"sm_80": "A100 80GB", "sm_90": "H100 SXM"}  # compile target -> roofline row


def accept_bytes(batch: int, gamma: int, vocab: int, rejected: int, itemsize: int = 4) -> int:
    """The accept kernel's traffic, per row: γ token ids (8 B) + γ gathered p, q and γ
    uniforms (4 B each); the p_n row and the uniforms row (2V · 4 B); the q_n row only if a
    draft was rejected (V · 4 B); two int64 outputs."""
    return (batch * (gamma * 20 + vocab * (itemsize + 4) + 16)
            + rejected * vocab * itemsize)


def kernel_traffic(batch: int = 2, gamma: int = 4, vocab: int = 32000) -> dict:
    """Bytes the sampling kernels move at a real vocabulary, counted in the interpreter, next
    to the analytic count and the bytes of one 7B-parameter fp16 decode step."""
    if not INTERPRET:
        raise RuntimeError("counting bytes needs Triton's interpreter: set KC_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(batch, gamma, vocab, generator=g), -1)
    p = torch.softmax(torch.randn(batch, gamma + 1, vocab, generator=g), -1)
    x = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).reshape(batch, gamma)
    with iocount.count() as accept_io:
        n, _ = speculative_accept(x, q, p, generator=g)
    with iocount.count() as sample_io:
        gumbel_sample(torch.randn(batch, vocab), generator=g)
    rejected = int((n < gamma).sum())
    return {"batch": batch, "gamma": gamma, "vocab": vocab, "rejected": rejected,
            "accept_bytes": accept_io.bytes_total,
            "accept_bytes_model": accept_bytes(batch, gamma, vocab, rejected),
            "sample_bytes": sample_io.bytes_total, "sample_bytes_model": batch * (8 * vocab + 8),
            "forward_7b_bytes": 7e9 * 2}


def gpu_prediction(traffic: dict, hw: str = "H100 SXM") -> dict:
    """Roofline time at the datasheet bandwidth of the accept kernel and of a memory-bound 7B
    fp16 decode step."""
    accept = roofline.predict(0.0, traffic["accept_bytes"], hw, "fp16")
    forward = roofline.predict(2 * 7e9, traffic["forward_7b_bytes"], hw, "fp16")
    return {"hardware": hw, "accept_us": accept.time_s * 1e6, "forward_ms": forward.time_s * 1e3,
            "accept_fraction": accept.time_s / forward.time_s}


def compiled_table(rows: list[dict]) -> list[dict]:
    """`compiled("sampling")` rows as flat records: kernel, case, target, dtype, registers,
    spills, shared memory and its limit, occupancy, warps, the instruction census and the
    launcher's block sizes by name."""
    kernels = ("gumbel_sample_kernel", "speculative_accept_kernel")
    out = []
    for r in rows:
        if r.get("status") != "ok" or r.get("kernel") not in kernels:
            raise ValueError(f"row for {r.get('case')} on {r.get('target')} is not a compiled "
                             f"sampling kernel: {r.get('status')}")
        out.append({"kernel": r["kernel"], "case": r["case"], "target": r["target"],
                    "dtype": r["dtype"], "registers": r["registers"],
                    "spill_bytes": r["spill_bytes"], "shared_bytes": r["shared_bytes"],
                    "shared_limit": r["shared_limit"], "occupancy": r["occupancy"],
                    "num_warps": r["num_warps"], "num_stages": r["num_stages"],
                    **r["census"], **r["constexprs"]})
    return out


def accept_prediction(row: dict, batch: int, gamma: int, vocab: int, *,
                      itemsize: int = 4) -> dict:
    """The accept kernel's predicted time at `batch` on the GPU of `row` (a compiled_table row
    of speculative_accept), every draft rejected (the q_n row read: the worst case).

    One loop iteration issues the loads of a p, a q and a uniforms tile (3 · BLOCK_V elements)
    and waits on them before reducing: with no cp.async pipelining that is what the CTA keeps
    in flight, split over its warps. Resident warps are batch × num_warps (one CTA per
    sequence) up to occupancy × the GPU's warp slots, the cap the registers set."""
    hw = roofline.hardware(TARGET_GPU[row["target"]])
    in_flight = (2 * itemsize + 4) * row["BLOCK_V"] / row["num_warps"]  # bytes per warp
    slots = hw.max_warps_per_sm * hw.sms
    resident = min(batch * row["num_warps"], row["occupancy"] * slots)
    bw = roofline.occupancy_bandwidth(hw, resident / slots, in_flight)
    nbytes = accept_bytes(batch, gamma, vocab, rejected=batch, itemsize=itemsize)
    forward = roofline.predict(2 * 7e9, 7e9 * 2, hw, "fp16").time_s
    return {"hardware": hw.name, "batch": batch, "bytes": nbytes, "bandwidth": bw,
            "occupancy_limited": batch * row["num_warps"] > row["occupancy"] * slots,
            "max_resident_batch": int(row["occupancy"] * slots // row["num_warps"]),
            "time_us": nbytes / bw * 1e6, "datasheet_us": nbytes / hw.mem_bw * 1e6,
            "fraction_of_7b_step": nbytes / bw / forward}


def memory_bound_c(drafter, target) -> float:
    """c on a GPU decoding at small batch, where a forward costs its weight bytes: the drafter's
    parameters (embedding, its blocks, head) over the target's. Our kernels' occupancy does not
    enter: a decode step's time is its matmuls', and the sampling kernels are < 0.1 % of it."""
    m = drafter.model
    blocks = m.layers if drafter.n_layers is None else m.layers[:drafter.n_layers]
    own = sum(p.numel() for p in blocks.parameters()) + m.embed.weight.numel() + \
        m.lm_head.weight.numel() + m.norm.weight.numel()
    return own / target.num_params()
