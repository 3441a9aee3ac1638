"""Pipeline parallelism: the runs behind the lab, and `kclub bench pipeline-parallel`.

One `launch.spawn` of p = 4 ranks runs every job (starting processes costs more than the
jobs): correctness jobs (gradients back), the bubble sweep over m, and our runtime against
torch.distributed.pipelining on the same stages, alternating job by job.

On a CPU the stage durations are emulated (stages.Slots: real arithmetic, then sleep to a fixed
slot): 4 ranks on 2 cores cannot all compute at once, so raw timings would measure the
contention, not the schedule. The raw-compute comparison runs too and is reported as such.
On a GPU nothing is emulated: each rank owns its device.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernels.device import gpu_available
from shared import roofline
from shared.benchmarks import record
from shared.device import pick
from shared.models.llama import LlamaConfig
from shared.parallel import launch
from shared.parallel.pipeline import Simulation, make_schedule, simulate
from shared.parallel.pipeline.timeline import bubble_fraction, durations, hop_latency, makespan
from shared.parallel.pipeline.worker import Job, ModelSpec, pipeline_worker

P = 4
SPEC = ModelSpec(pick(
    ci=LlamaConfig(vocab_size=256, dim=64, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=128,
                   max_seq_len=32),
    full=LlamaConfig(vocab_size=256, dim=1024, n_layers=16, n_heads=16, n_kv_heads=8,
                     ffn_dim=2816, max_seq_len=512)), seq_len=pick(ci=32, full=512))
MICROBATCH = pick(ci=2, full=4)
SWEEP_M = pick(ci=[1, 2, 4, 8, 16], full=list(range(1, 17)))
CLAIM_M = (8, 16)  # where the interleaved and ZB-H1 ratios are recorded


def repeats(m: int) -> int:
    """Runs per sweep point (the least disturbed one counts): more where claims are read."""
    return pick(ci=3 if m in CLAIM_M else 2, full=3)


COMPARE_M = 8
TORCH_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


def slot_s() -> float | None:
    """Emulated f = b = w per stage (seconds) on CPU; None (real compute) on a GPU."""
    return None if gpu_available() else pick(ci=0.025, full=0.04)


@dataclass
class Result:
    job: Job
    loss: float  # mean loss of the batch (last stage), first step
    step_s: float  # best step time after the first (warm-up; torch infers shapes in it)
    spans: list  # per rank: (Action, start, end) of the first step (ours only)
    peak: list[int]  # per rank: most stashed microbatch-chunks (ours only)
    peak_bytes: list[int]  # per rank: most stashed activation bytes (ours only)
    tokens: int
    grads: dict | None

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.spans)

    @property
    def idle_s(self) -> float:
        """Idle time per rank (seconds): the bubble, in time."""
        return self.bubble * makespan(self.spans)

    @property
    def throughput(self) -> float:
        return self.tokens / self.step_s


def plan(sweep_m=SWEEP_M) -> list[Job]:
    """Every job of the lab, in run order."""
    slot = slot_s()
    slots = (slot, slot, slot) if slot else None
    chunks = lambda name: 2 if name == "interleaved-1f1b" else 1
    jobs = [Job("ours", n, 4, chunks=chunks(n), microbatch_size=MICROBATCH, grads=True,
                label="proof") for n in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")]
    jobs += [Job("torch", n, 4, chunks=chunks(n), microbatch_size=MICROBATCH, grads=True,
                 label="proof") for n in TORCH_SCHEDULES]
    for name in ("gpipe", "1f1b", "zb-h1"):  # the bubble sweep, emulated slots
        jobs += [Job("ours", name, m, microbatch_size=MICROBATCH, slots=slots,
                     steps=repeats(m), label="sweep") for m in sweep_m]
    half = tuple(s / 2 for s in slots) if slots else None  # v = 2 chunks: half the work each
    jobs += [Job("ours", "interleaved-1f1b", m, chunks=2, microbatch_size=MICROBATCH,
                 slots=half, steps=repeats(m), label="sweep") for m in sweep_m if m % P == 0]
    # Ours vs torch.distributed.pipelining, alternating, one warm-up step each (torch's first
    # step also infers shapes).
    modes = [((slots, half), 3, "emulated"), ((None, None), 3, "compute")] if slots \
        else [((None, None), 6, "compute")]
    for emulated, steps, label in modes:
        for name in TORCH_SCHEDULES:
            for runtime in ("ours", "torch"):
                jobs.append(Job(runtime, name, COMPARE_M, chunks=chunks(name),
                                microbatch_size=MICROBATCH, steps=steps,
                                slots=emulated[chunks(name) - 1], label=label))
        jobs.append(Job("ours", "zb-h1", COMPARE_M, microbatch_size=MICROBATCH, steps=steps,
                        slots=emulated[0], label=label))
    return jobs


def run(jobs: list[Job], *, timeout_s: float = 900) -> list[Result]:
    """Run all jobs on P ranks (one process group) and gather each job's result.

    Timelines come from the step with the shortest makespan and step times are the best after
    the warm-up step: other work on a shared machine only ever delays a rank, so the least
    disturbed step is the truest (timeit's rule)."""
    per_rank = launch.spawn(pipeline_worker, P, SPEC, jobs, timeout_s=timeout_s)
    results = []
    for j, job in enumerate(jobs):
        steps = [[per_rank[r][j][s] for r in range(P)] for s in range(job.steps)]
        first = steps[0]
        loss = next(rec["loss"] for rec in first if rec["loss"] is not None)
        times = [max(rec["time_s"] for rec in step) for step in steps]
        ours = first[0]["run"] is not None
        best = min(steps, key=lambda st: makespan([rec["run"].spans for rec in st])) \
            if ours else first
        runs = [rec["run"] for rec in best]
        results.append(Result(
            job, loss, min(times[1:] if len(times) > 1 else times),
            [run.spans for run in runs] if ours else [],
            [run.peak_stashed for run in runs] if ours else [],
            [run.peak_stashed_bytes for run in runs] if ours else [],
            first[0]["tokens"],
            {n: g for rec in first for n, g in rec.get("grads", {}).items()} or None))
    return results


def find(results: list[Result], label: str, runtime: str, name: str,
         m: int | None = None) -> Result:
    """The result of one job: `label` is "proof", "sweep", "emulated" or "compute"."""
    for r in results:
        j = r.job
        if (j.label, j.runtime, j.schedule) == (label, runtime, name) and \
                m in (None, j.num_microbatches):
            return r
    raise KeyError((label, runtime, name, m))


def sweep(results: list[Result], name: str) -> list[Result]:
    """The bubble sweep of one schedule, by m."""
    return [r for r in results if r.job.label == "sweep" and r.job.schedule == name]


def overrun_share(result: Result) -> float:
    """Share of actions that outlasted their emulated slot by more than 20 %: the emulation
    holds only if the real arithmetic fits in the slot."""
    f, b, w = result.job.slots
    limit = {"F": f, "B": b, "W": w, "BW": b + w}
    spans = [x for rank in result.spans for x in rank]
    return sum(e - s > 1.2 * limit[a.kind] for a, s, e in spans) / len(spans)


def predicted_bubble(name: str, m: int, chunks: int = 1) -> float:
    """The simulator's bubble with f = b = w (per chunk: 1 / v)."""
    return simulate(make_schedule(name, P, m, chunks=chunks), f=1 / chunks, b=1 / chunks,
                    w=1 / chunks).bubble_fraction


def calibrated(result: Result) -> Simulation:
    """The simulator fed with this run's own median action durations and message latency:
    what the schedule should give on this runtime if nothing stalled."""
    job = result.job
    sched = make_schedule(job.schedule, P, job.num_microbatches, chunks=job.chunks)
    d = durations(result.spans)
    b, w = (d["B"], d["W"]) if "W" in d else (d["BW"] / 2, d["BW"] / 2)
    return simulate(sched, d["F"], b, w, comm=hop_latency(sched, result.spans))


def stage_flops(cfg: LlamaConfig, tokens: int, seq: int) -> float:
    """Forward FLOPs of one Llama block on `tokens` tokens (2 per multiply-add; causal
    attention scores and values: 2 * 2 * T / 2 * D per token)."""
    kv = cfg.n_kv_heads * cfg.head_dim
    weights = cfg.dim * (2 * cfg.dim + 2 * kv) + 3 * cfg.dim * cfg.ffn_dim
    return tokens * (2 * weights + 2 * seq * cfg.dim)


def stage_weight_bytes(cfg: LlamaConfig, layers: int) -> int:
    """bf16 weight bytes of `layers` blocks: each read once per forward."""
    kv = cfg.n_kv_heads * cfg.head_dim
    return 2 * layers * (cfg.dim * (2 * cfg.dim + 2 * kv) + 3 * cfg.dim * cfg.ffn_dim)


# Point-to-point bandwidth between neighbouring stages, bytes/s per direction (vendor specs):
# inside a node over NVLink, across nodes over one InfiniBand NIC per GPU.
LINKS = {"H100 SXM": {"NVLink 4": 450e9, "InfiniBand NDR 400G": 50e9},
         "A100 80GB": {"NVLink 3": 300e9, "InfiniBand HDR 200G": 25e9}}


def gpu_prediction(hw: str, cfg: LlamaConfig, layers_per_stage: int, microbatch: int,
                   seq: int, link_bw: float) -> dict:
    """One stage's forward time (roofline, bf16 as fp16 peak), its activation's transfer
    time over `link_bw`, and their ratio: when transfer << compute, the schedule's bubble is
    what a GPU run shows."""
    tokens = microbatch * seq
    flops = layers_per_stage * stage_flops(cfg, tokens, seq)
    bytes_moved = stage_weight_bytes(cfg, layers_per_stage) + 4 * tokens * cfg.dim
    f = roofline.predict(flops, bytes_moved, hw, "fp16").time_s
    send = 2 * tokens * cfg.dim / link_bw
    return {"forward_s": f, "send_s": send, "send_over_forward": send / f}


def main() -> int:
    if gpu_available():
        import torch

        if torch.cuda.device_count() < P:
            # Each rank owns a GPU (NCCL); fewer GPUs would put ranks on the CPU under gloo
            # and time that instead, so nothing is measured rather than the wrong thing.
            record("pipeline parallelism (skipped)",
                   {"note": f"needs {P} GPUs, one per rank; this machine has "
                            f"{torch.cuda.device_count()}"})
            return 0
    jobs = plan()
    print(f"pipeline-parallel: {len(jobs)} jobs on {P} ranks, slot {slot_s()} s, "
          f"model {SPEC.config}")
    results = run(jobs)
    for name in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1"):
        for r in sweep(results, name):
            m, v = r.job.num_microbatches, r.job.chunks
            record("bubble fraction, measured vs model",
                   {"schedule": name, "m": m, "bubble": r.bubble,
                    "model": predicted_bubble(name, m, v)})
    for label in ("emulated", "compute"):
        for name in TORCH_SCHEDULES:
            try:
                ours = find(results, label, "ours", name)
                theirs = find(results, label, "torch", name)
            except KeyError:
                continue
            record("ours vs torch.distributed.pipelining, tokens/s",
                   {"stages": label, "schedule": name, "ours": ours.throughput,
                    "torch": theirs.throughput, "ratio": ours.throughput / theirs.throughput})
    return 0


if __name__ == "__main__":
    main()
