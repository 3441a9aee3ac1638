"""Pipeline parallelism: the runs behind the lab, and `kclub bench pipeline-parallel`.

One `launch.spawn` of p = 4 ranks runs every job (starting processes costs more than the
jobs): correctness jobs (gradients back, ours and torch.distributed.pipelining's), the bubble
sweep over m, and our runtime against torch's on the same stages, alternating step by step
(paired rounds, so the ratio of step times gets a bootstrap interval, shared.bench.ratio).

On a CPU the stage durations are emulated (stages.Slots: real arithmetic, then sleep to a fixed
slot): 4 ranks on 2 cores cannot all compute at once, so raw timings would measure the
contention, not the schedule. The raw-compute comparison runs too and is reported as such.
On a GPU nothing is emulated: each rank owns its device.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernels.device import gpu_available
from shared import roofline
from shared.bench import Ratio, ratio
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
CLAIM_M = (8, 16)  # where the lab's claims read the sweep
COMPARE_M = 8
ROUNDS = {"emulated": pick(ci=3, full=4), "compute": pick(ci=6, full=10)}
TORCH_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")  # compared in time (fused backward)
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


def slot_s() -> float | None:
    """Emulated f = b = w per stage (seconds) on CPU; None (real compute) on a GPU."""
    return None if gpu_available() else pick(ci=0.025, full=0.04)


def repeats(m: int) -> int:
    """Steps per sweep point; the median step (by makespan) is read, never the best."""
    return 3 if m in CLAIM_M else 1


def chunks(name: str) -> int:
    return 2 if name == "interleaved-1f1b" else 1


@dataclass
class Result:
    job: Job
    loss: float  # mean loss of the batch (last stage), first step
    spans: list  # per rank: (Action, start, end) of the median step by makespan (ours only)
    peak: list[int]  # per rank: most stashed microbatch-chunks (ours only)
    peak_bytes: list[int]  # per rank: most bytes held for backwards (ours only)
    peak_sends: list[int]  # per rank: most send buffers held between actions (ours only)
    tokens: int
    grads: dict | None
    times: dict[str, list[float]]  # runtime -> step times (s), in step order, warm-up first

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.spans)

    @property
    def idle_s(self) -> float:
        """Idle time per rank (seconds): the bubble, in time."""
        return self.bubble * makespan(self.spans)

    def ratio(self) -> Ratio:
        """Step time ours / torch over the paired rounds of a "both" job (its first pair is
        the warm-up: torch infers shapes in it), with a bootstrap 95% interval."""
        return ratio(self.times["ours"][1:], self.times["torch"][1:])


def plan(sweep_m=SWEEP_M) -> list[Job]:
    """Every job of the lab, in run order."""
    slot = slot_s()
    slots = (slot, slot, slot) if slot else None
    jobs = [Job(runtime, n, 4, chunks=chunks(n), microbatch_size=MICROBATCH, grads=True,
                label="proof") for runtime in ("ours", "torch") for n in SCHEDULE_NAMES]
    half = tuple(s / 2 for s in slots) if slots else None  # v = 2 chunks: half the work each
    for name in SCHEDULE_NAMES:  # the bubble sweep, emulated slots
        jobs += [Job("ours", name, m, chunks=chunks(name), microbatch_size=MICROBATCH,
                     slots=half if chunks(name) == 2 else slots, steps=repeats(m), label="sweep")
                 for m in sweep_m if chunks(name) == 1 or m % P == 0]
    # Ours vs torch.distributed.pipelining: one job per schedule whose steps alternate ours,
    # torch, ours, ... so drift hits both alike (paired rounds, as bench.compare does).
    modes = [((slots, half), "emulated"), ((None, None), "compute")] if slots \
        else [((None, None), "compute")]
    for emulated, label in modes:
        for name in TORCH_SCHEDULES:
            jobs.append(Job("both", name, COMPARE_M, chunks=chunks(name),
                            microbatch_size=MICROBATCH, steps=2 * (1 + ROUNDS[label]),
                            slots=emulated[chunks(name) - 1], label=label))
    return jobs


def run(jobs: list[Job], *, timeout_s: float = 900) -> list[Result]:
    """Run all jobs on P ranks (one process group) and gather each job's result.

    A step's time is its slowest rank's, barrier to barrier. Timelines, memory and bubbles come
    from the step with the median makespan: the typical step, not the least disturbed one."""
    per_rank = launch.spawn(pipeline_worker, P, SPEC, jobs, timeout_s=timeout_s)
    results = []
    for j, job in enumerate(jobs):
        steps = [[per_rank[r][j][s] for r in range(P)] for s in range(job.steps)]
        loss = next(rec["loss"] for rec in steps[0] if rec["loss"] is not None)
        times: dict[str, list[float]] = {}
        for step in steps:
            times.setdefault(step[0]["runtime"], []).append(max(rec["time_s"] for rec in step))
        ours = sorted((st for st in steps if st[0]["run"] is not None),
                      key=lambda st: makespan([rec["run"].spans for rec in st]))
        runs = [rec["run"] for rec in ours[(len(ours) - 1) // 2]] if ours else []
        results.append(Result(
            job, loss, [run.spans for run in runs], [run.peak_stashed for run in runs],
            [run.peak_stashed_bytes for run in runs], [run.peak_sends for run in runs],
            steps[0][0]["tokens"],
            {n: g for rec in steps[0] for n, g in rec.get("grads", {}).items()} or None, times))
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


def paper_bubble(name: str, m: int, chunks: int = 1) -> float:
    """The papers' bubble (the simulator with f = b = w, free messages; per chunk 1 / v)."""
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
GPU_MEMORY = {"H100 SXM": 80e9, "A100 80GB": 80e9}  # bytes of HBM


def training_bytes_per_gpu(cfg: LlamaConfig, *, tp: int, pp: int, microbatch: int,
                           seq: int) -> dict:
    """Memory of one GPU on the first pipeline stage (the fullest under 1F1B: p microbatches
    in flight). Model states: 16 bytes per parameter (bf16 weights and gradients, fp32 master
    weights and Adam's two moments; ZeRO §3), split over tp * pp GPUs. Activations: 34·s·b·h
    bytes per layer and microbatch, divided by tp with sequence parallelism (Korthikanti et al.
    2022, Table 2, selective recomputation)."""
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = cfg.dim * (2 * cfg.dim + 2 * kv) + 3 * cfg.dim * cfg.ffn_dim
    params = cfg.n_layers * per_layer + 2 * cfg.vocab_size * cfg.dim
    states = 16 * params / (tp * pp)
    in_flight = pp  # 1F1B's first stage holds p microbatches
    acts = (cfg.n_layers / pp) * in_flight * 34 * seq * microbatch * cfg.dim / tp
    return {"states": states, "activations": acts, "total": states + acts}


def gpu_prediction(hw: str, cfg: LlamaConfig, layers_per_stage: int, microbatch: int,
                   seq: int, link_bw: float, *, tp: int = 1) -> dict:
    """One GPU of a TP x PP grid: its share of a stage's forward (roofline, bf16 as fp16 peak;
    tensor parallelism over `tp` GPUs divides FLOPs and weight bytes by tp), the time to send
    its share of the activation to the next stage over `link_bw` (Megatron's scatter/gather:
    each of the tp GPUs sends 1/tp over its own NIC, Narayanan et al. 2021b §4.1), and the
    tensor-parallel all-reduces inside the stage (2 per layer, ring, over NVLink)."""
    if tp < 1 or cfg.n_heads % tp or cfg.n_kv_heads % tp:
        raise ValueError(f"tp must divide n_heads={cfg.n_heads} and n_kv_heads="
                         f"{cfg.n_kv_heads}, got {tp}")
    tokens = microbatch * seq
    act = 2 * tokens * cfg.dim  # bf16 activation [b, s, h]
    flops = layers_per_stage * stage_flops(cfg, tokens, seq) / tp
    bytes_moved = stage_weight_bytes(cfg, layers_per_stage) / tp + 2 * act
    f = roofline.predict(flops, bytes_moved, hw, "fp16").time_s
    send = act / tp / link_bw
    nvlink = next(bw for name, bw in LINKS[hw].items() if name.startswith("NVLink"))
    allreduce = layers_per_stage * 2 * 2 * (tp - 1) / tp * act / nvlink
    return {"forward_s": f, "send_s": send, "send_over_forward": send / f,
            "tp_allreduce_s": allreduce}


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
    for name in SCHEDULE_NAMES:
        for r in sweep(results, name):
            m, v = r.job.num_microbatches, r.job.chunks
            record("bubble fraction, measured vs models",
                   {"schedule": name, "m": m, "bubble": r.bubble,
                    "calibrated": calibrated(r).bubble_fraction,
                    "paper": paper_bubble(name, m, v)})
    for label in ("emulated", "compute"):
        for name in TORCH_SCHEDULES:
            try:
                r = find(results, label, "both", name)
            except KeyError:
                continue
            q = r.ratio()
            record("step time, ours / torch.distributed.pipelining",
                   {"stages": label, "schedule": name, "ratio": q.median, "low": q.low,
                    "high": q.high, "rounds": q.n})
    return 0


if __name__ == "__main__":
    main()
