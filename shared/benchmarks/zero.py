"""DDP and ZeRO: the runs behind the `zero` lab, and `kclub bench zero`.

One `launch.spawn` of P = 4 ranks runs every job (starting processes costs more than the
jobs; jobs on Nd = 1 or 2 ranks run in subgroups while the other ranks wait):
- proof: DDP and ZeRO-1/2/3 with ring collectives, and torch's FSDP2, 3 fp32 steps, params back;
  and ZeRO-3 with loss scaling where rank 1 alone meets an overflow at step 1;
- bytes: one bf16 step per stage at Nd = 1, 2, 4 (per-rank model-state bytes, Figure 1's setup);
- scaling: DDP and ZeRO-3 at Nd = 1, 2, 4 with emulated compute (each block's forward padded
  to SLOT_S and its backward to 2 SLOT_S: 4 ranks share 2 cores, so real compute would measure
  the contention); timelines come from these; and one ZeRO-3 job whose steps alternate
  prefetch on and off (paired rounds for a bootstrap interval);
- collectives: our ring reduce-scatter, gloo's reduce-scatter and gloo's all-reduce on one
  buffer, interleaved round by round.
Activation checkpointing is measured in this process: peak saved bytes against depth, and
interleaved step times against the forward alone.
On a GPU nothing is emulated (slot None): each rank owns its device.
"""

from __future__ import annotations

import statistics

import torch

from kernels.device import gpu_available
from shared import roofline
from shared.bench import compare, one_thread
from shared.benchmarks import record
from shared.benchmarks.pipeline_parallel import LINKS
from shared.device import pick
from shared.models.llama import Llama, LlamaConfig
from shared.parallel import launch
from shared.parallel.memory import checkpointing
from shared.parallel.memory.checkpointing import SCHEDULES, llama_step
from shared.parallel.zero.accounting import GB, fit_replicated_sharded
from shared.parallel.zero.model import ModelSpec
from shared.parallel.zero.worker import Job, zero_worker

P = 4
NDS = (1, 2, 4)
STAGES = (0, 1, 2, 3)
SPEC = ModelSpec(pick(
    ci=LlamaConfig(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=168,
                   max_seq_len=32),
    full=LlamaConfig(vocab_size=256, dim=1024, n_layers=16, n_heads=16, n_kv_heads=8,
                     ffn_dim=2816, max_seq_len=512)), seq_len=pick(ci=31, full=512))
LOCAL_BATCH = pick(ci=2, full=8)
SCALING_STEPS = pick(ci=4, full=10)
PREFETCH_ROUNDS = pick(ci=6, full=10)  # ZeRO-3 steps with prefetch, each paired with one without
COLLECTIVE_NUMEL = pick(ci=2**20, full=2**26)  # fp32 elements: 4 MiB on CPU
COLLECTIVE_ROUNDS = pick(ci=8, full=20)


def slot_s() -> float | None:
    """Emulated forward time per block (seconds) on a CPU; None (real compute) on a GPU."""
    return None if gpu_available() else 0.02


def plan() -> list[Job]:
    slot = slot_s()
    jobs = [Job(s, steps=3, params=True, impl="ring", local_batch=LOCAL_BATCH, label="proof")
            for s in STAGES]
    jobs.append(Job(3, runtime="fsdp2", steps=3, params=True, local_batch=LOCAL_BATCH,
                    label="fsdp2"))
    jobs.append(Job(3, steps=3, params=True, impl="ring", local_batch=LOCAL_BATCH,
                    loss_scale=2.0**10, plant_at=1, label="overflow"))
    jobs += [Job(s, steps=1, dtype="bf16", impl="ring", world=n, local_batch=LOCAL_BATCH,
                 label="bytes") for s in STAGES for n in NDS]
    jobs += [Job(s, steps=SCALING_STEPS, impl="ring", world=n, slot_s=slot,
                 local_batch=LOCAL_BATCH, label="scaling") for s in (0, 3) for n in NDS]
    jobs.append(Job(3, steps=2 * (1 + PREFETCH_ROUNDS), impl="ring", alternate=True,
                    slot_s=slot, local_batch=LOCAL_BATCH, label="prefetch"))
    jobs.append(Job(0, runtime="collectives", steps=COLLECTIVE_ROUNDS, numel=COLLECTIVE_NUMEL,
                    label="collectives"))
    return jobs


def run(jobs: list[Job], *, timeout_s: float = 600) -> list[tuple[Job, list[dict]]]:
    """Every job on P ranks in one process group: (job, its ranks' records)."""
    per_rank = launch.spawn(zero_worker, P, SPEC, jobs, timeout_s=timeout_s)
    return [(job, [per_rank[r][j] for r in range(job.world or P)])
            for j, job in enumerate(jobs)]


def find(results, label: str, stage: int | None = None, world: int | None = None,
         runtime: str = "ours"):
    """The records of one job."""
    for job, recs in results:
        if job.label == label and job.runtime == runtime and stage in (None, job.stage) \
                and (job.world or P) == (world or job.world or P):
            return job, recs
    raise KeyError((label, stage, world, runtime))


def mean_losses(recs: list[dict]) -> list[float]:
    """The global loss per step: the mean of the ranks' local means (equal local batches)."""
    return [statistics.fmean(r["losses"][s] for r in recs) for s in range(len(recs[0]["losses"]))]


def step_times(recs: list[dict], warmup: int = 1) -> list[float]:
    """Each step's time: its slowest rank's (barrier to end of update), warm-up dropped."""
    return [max(r["times"][s] for r in recs) for s in range(warmup, len(recs[0]["times"]))]


def figure1_from_measured(results, psi: int, big_psi: float = 7.5e9, nd: int = 64
                          ) -> dict[int, float]:
    """Figure 1's per-device GB, from our bytes: each state's per-rank bytes at Nd = 1, 2, 4
    fitted as replicated + sharded / Nd, per parameter, then evaluated at `nd` for `big_psi`."""
    out = {}
    for stage in STAGES:
        total = 0.0
        for state in ("params", "grads", "optimizer"):
            ys = [find(results, "bytes", stage, n)[1][0]["bytes"][0][state] for n in NDS]
            a, b = fit_replicated_sharded(list(NDS), ys)
            total += (a + b / nd) / psi * big_psi
        out[stage] = total / GB
    return out


def weak_scaling(results, stage: int) -> dict[int, float]:
    """Efficiency t(1) / t(Nd) with a fixed batch per rank (median step times)."""
    t = {n: statistics.median(step_times(find(results, "scaling", stage, n)[1])) for n in NDS}
    return {n: t[1] / t[n] for n in NDS}


def prefetch_rounds(results) -> dict[str, list[float]]:
    """The alternating job's step times (slowest rank) and rank 0's time blocked on gathers,
    with and without prefetch, paired round by round; the first pair warms up."""
    _, recs = find(results, "prefetch", 3)
    times = step_times(recs, warmup=2)
    waits = [sum(b - a for kind, _, a, b in spans if kind == "wait")
             for spans in recs[0]["spans"][2:]]
    return {"on": times[0::2], "off": times[1::2], "wait_on": waits[0::2],
            "wait_off": waits[1::2]}


def ring_time(nbytes: float, n: int, alpha: float, beta: float, passes: int) -> float:
    """α-β time of `passes` ring passes (1: reduce-scatter or all-gather; 2: all-reduce) over
    a buffer of `nbytes`: each pass is n - 1 steps of one latency α and nbytes / n at β B/s."""
    return passes * (n - 1) * (alpha + nbytes / n / beta)


def h100_efficiency(psi: float, tokens_per_gpu: int, n: int = 8, *, stage: int = 0,
                    alpha: float = 10e-6) -> dict[str, float]:
    """Predicted weak-scaling efficiency of data parallelism on n H100s over NVLink 4 (α-β).
    Compute: the roofline time of one step's counted work, 6 Ψ FLOPs per token (forward 2,
    backward 4) and the bf16 weights read three times plus the gradients written once (8Ψ
    bytes), at the bf16 peak: the shortest compute, so the most pessimistic efficiency.
    Communication: bf16 gradients (2Ψ bytes) over the ring, 2 passes for DDP, 3 for ZeRO-3
    (§7). Two bounds: nothing overlapped, and communication hidden behind the backward
    (2/3 of the compute) as far as it fits. α per ring step is an assumption."""
    compute = roofline.predict(6 * psi * tokens_per_gpu, 8 * psi, "H100 SXM", "bf16").time_s
    comm = ring_time(2 * psi, n, alpha, LINKS["H100 SXM"]["NVLink 4"], 3 if stage == 3 else 2)
    exposed = max(0.0, comm - 2 / 3 * compute)
    return {"compute_s": compute, "comm_s": comm,
            "no_overlap": compute / (compute + comm), "overlap": compute / (compute + exposed)}


CKPT_NS = pick(ci=[4, 9, 16, 25], full=[4, 9, 16, 25, 36, 49, 64])
CKPT_TIME_N = pick(ci=9, full=64)
CKPT_ROUNDS = pick(ci=30, full=40)


def checkpoint_model(n: int, seed: int = 0) -> Llama:
    """A deep, narrow Llama for the checkpointing measurements: n blocks."""
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=256, dim=64, n_layers=n, n_heads=4, n_kv_heads=2,
                             ffn_dim=128, max_seq_len=128))


def checkpoint_tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 129), generator=torch.Generator().manual_seed(seed))


def checkpoint_peaks(ns=CKPT_NS) -> dict[str, list[int]]:
    """Peak bytes autograd holds for the backward, per schedule, for each depth n."""
    tokens = checkpoint_tokens()
    with one_thread():
        return {s: [llama_step(checkpoint_model(n), tokens, s)[1].peak for n in ns]
                for s in SCHEDULES}


def checkpoint_times(n: int = CKPT_TIME_N, rounds: int = CKPT_ROUNDS) -> dict:
    """Interleaved timings (shared.bench.compare) of a training step under each schedule and
    of the forward alone without a graph: the pass checkpointing adds (its backward re-runs
    the forward with a graph in place of the one a plain step builds)."""
    model, tokens = checkpoint_model(n), checkpoint_tokens()

    def step(schedule):
        model.zero_grad(set_to_none=True)
        return llama_step(model, tokens, schedule, count=False)[0]

    @torch.no_grad()
    def forward():  # what checkpointing adds: the first forward, which builds no graph
        h = checkpointing.run(model.layers, model.embed(tokens[:, :-1]), "none")
        return model.lm_head(model.norm(h))

    fns = {s: (lambda s=s: step(s)) for s in SCHEDULES}
    with one_thread():
        return compare({**fns, "forward": forward}, warmup=1, repeat=rounds)


def main() -> int:
    if gpu_available():
        import torch

        if torch.cuda.device_count() < P:
            record("zero (skipped)", {"note": f"needs {P} GPUs, one per rank; this machine has "
                                              f"{torch.cuda.device_count()}"})
            return 0
    results = run(plan())
    for stage in (0, 3):
        for n, e in weak_scaling(results, stage).items():
            record("weak scaling, emulated compute", {"stage": stage, "Nd": n, "efficiency": e})
    t = checkpoint_times()
    for name, timing in t.items():
        record("activation checkpointing, step time", {"schedule": name,
                                                       "median_s": timing.median_s})
    _, recs = find(results, "collectives", runtime="collectives")
    for name, ts in recs[0]["times"].items():
        record("reduce-scatter of one buffer", {"op": name, "median_s": statistics.median(ts),
                                                "numel": COLLECTIVE_NUMEL})
    return 0


if __name__ == "__main__":
    main()
