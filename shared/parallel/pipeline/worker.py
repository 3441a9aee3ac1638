"""The training script on top: build the model on every rank, run pipeline jobs, report.

`pipeline_worker(spec, jobs)` is what `launch.spawn` runs on each rank; ``python -m
torch.distributed.run --standalone --nproc-per-node=4 -m shared.parallel.pipeline.worker
--schedule 1f1b --microbatches 8`` runs one job the torchrun way (and spans nodes).
Every rank builds the full model from the same seed and keeps its stages: simple and exactly
reproducible at this size; a large model would build only its own layers.
"""

from __future__ import annotations

import argparse
import functools
import gc
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shared.data import batches, train_val_tokens
from shared.models.llama import Llama, LlamaConfig
from shared.parallel import launch
from shared.parallel.pipeline.comms import P2P
from shared.parallel.pipeline.runtime import run_schedule
from shared.parallel.pipeline.schedules import Action, make_schedule
from shared.parallel.pipeline.stages import Slots, split_llama
from shared.parallel.pipeline.validate import validate


@dataclass(frozen=True)
class ModelSpec:
    config: LlamaConfig
    seq_len: int
    seed: int = 0


DEFAULT_SPEC = ModelSpec(LlamaConfig(vocab_size=256, dim=64, n_layers=8, n_heads=4,
                                     n_kv_heads=2, ffn_dim=128, max_seq_len=32), seq_len=32)


@dataclass(frozen=True)
class Job:
    runtime: str  # "ours", "torch" (torch.distributed.pipelining), or "both": steps
                  # alternate ours, torch, ours, ... (paired rounds for a timing ratio)
    schedule: str
    num_microbatches: int
    chunks: int = 1
    microbatch_size: int = 2
    slots: tuple[float, float, float] | None = None  # emulated f, b, w seconds (stages.py)
    steps: int = 1
    grads: bool = False  # return this rank's parameter gradients (first step)
    fail_at: int | None = None  # fault injection: rank 1 meets an unknown action here
    label: str = ""  # the caller's name for the job's purpose (e.g. "sweep")
    lookahead: int | None = None  # receives posted early (comms.py); None: by backend


def build_model(spec: ModelSpec) -> Llama:
    torch.manual_seed(spec.seed)
    return Llama(spec.config)


def make_batch(spec: ModelSpec, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) [n_seqs, seq_len] from the shared corpus, the same on every rank."""
    train = _corpus()
    gen = torch.Generator().manual_seed(spec.seed + n_seqs)
    return next(batches(train, n_seqs, spec.seq_len, generator=gen))


@functools.cache
def _corpus() -> torch.Tensor:
    return train_val_tokens(200_000)[0]


def reference(spec: ModelSpec, n_seqs: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Single-process training step on the same batch: mean loss and every gradient."""
    model = build_model(spec)
    tokens, targets = make_batch(spec, n_seqs)
    loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _run_job(model: Llama, spec: ModelSpec, job: Job, rank: int, p: int) -> list[dict]:
    names = {id(q): n for n, q in model.named_parameters()}
    slots = Slots(*job.slots) if job.slots else None
    stages_all = split_llama(model, p * job.chunks, slots=slots)
    stages = {c: stages_all[c * p + rank] for c in range(job.chunks)}
    m, b = job.num_microbatches, job.microbatch_size
    dev = launch.device()
    tokens, targets = (t.to(dev) for t in make_batch(spec, m * b))
    schedule = validate(make_schedule(job.schedule, p, m, chunks=job.chunks))
    if job.fail_at is not None and rank == 1:
        actions = list(schedule.ranks[1])
        actions.insert(job.fail_at, Action("crash", 0))  # run_schedule raises on it
        schedule = type(schedule)(schedule.name, p, m, job.chunks,
                                  schedule.ranks[:1] + (tuple(actions),) + schedule.ranks[2:])
    torch_pp = None
    if job.runtime not in ("ours", "torch", "both"):
        raise ValueError(f"job.runtime must be 'ours', 'torch' or 'both', got {job.runtime!r}")
    if job.runtime != "ours":  # imported on demand: torch.distributed.pipelining takes ~3 s
        from shared.parallel.pipeline.torch_pp import TorchPipeline
        torch_pp = TorchPipeline(job.schedule, rank, p, stages, m, dev)
    hidden = torch.empty(b, spec.seq_len, spec.config.dim, device=dev)
    out = []
    # Collect garbage between jobs, never during a step: a collection stalls a rank for up to
    # hundreds of ms, and in a pipeline one straggler delays every rank (Megatron-LM's "manual
    # GC" does the same).
    gc.collect()
    for step in range(job.steps):
        model.zero_grad(set_to_none=True)
        gc.disable()
        try:
            dist.barrier()
            t0 = time.perf_counter()
            runtime = "torch" if job.runtime == "torch" or (
                job.runtime == "both" and step % 2) else "ours"
            if runtime == "torch":
                loss, run = torch_pp.step(tokens, targets), None
            else:
                comm = P2P(schedule, rank, hidden, launch.TIMEOUT_S, lookahead=job.lookahead)
                micro = list(zip(tokens.split(b), targets.split(b), strict=True))
                run = run_schedule(schedule, rank, stages, micro, comm=comm, t0=t0)
                loss = run.loss
            dist.barrier()
        finally:
            gc.enable()
        rec = {"job": job, "step": step, "runtime": runtime, "loss": loss,
               "time_s": time.perf_counter() - t0, "run": run, "tokens": tokens.numel()}
        if job.grads and step == 0:
            rec["grads"] = {names[id(q)]: q.grad.detach().cpu() for c in stages
                            for q in stages[c].parameters() if q.grad is not None}
        out.append(rec)
    return out


def pipeline_worker(spec: ModelSpec, jobs: list[Job]) -> list[list[dict]]:
    """Runs on every rank (launch.spawn or torchrun); returns, per job, one record per step."""
    rank, p = dist.get_rank(), dist.get_world_size()
    model = build_model(spec).to(launch.device())
    gc.freeze()  # what exists now (torch's modules, the model) is never scanned again
    return [_run_job(model, spec, job, rank, p) for job in jobs]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--runtime", default="ours", choices=("ours", "torch"))
    args = ap.parse_args(argv)
    rank, _ = launch.init_from_env()
    try:
        (rec,) = pipeline_worker(DEFAULT_SPEC, [Job(args.runtime, args.schedule, args.microbatches,
                                            args.chunks)])[0]
        if rec["loss"] is not None:
            print(f"rank {rank}: {args.runtime} {args.schedule} loss {rec['loss']:.6f} "
                  f"step {rec['time_s'] * 1e3:.1f} ms", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
