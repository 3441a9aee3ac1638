"""The training script on top: what `launch.spawn` runs on each rank, and the one-process
reference every stage must match.

`zero_worker(spec, jobs)` builds the model from the same seed on every rank (the whole model,
then sharded: simple at this size; a large model would build only its shard), runs each job
on a fresh engine and returns, per job, what the lab reads: losses, per-rank model-state
bytes, step times, the compute and communication spans, the parameter-memory timeline and,
if asked, the final parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.models.llama import LlamaConfig
from shared.parallel import comm_log, launch
from shared.parallel.collectives.ring import ring_reduce_scatter
from shared.parallel.memory.mixed_precision import DTYPES, LossScaler
from shared.parallel.zero.comm import CommThread
from shared.parallel.zero.engine import ZeroEngine
from shared.parallel.zero.model import ModelSpec, batch, build_model, loss_fn

DEFAULT_SPEC = ModelSpec(LlamaConfig(vocab_size=256, dim=64, n_layers=4, n_heads=4,
                                     n_kv_heads=2, ffn_dim=168, max_seq_len=32), seq_len=31)


@dataclass(frozen=True)
class Job:
    stage: int                     # 0 = DDP, 1-3 = ZeRO stage (ignored by "fsdp2")
    runtime: str = "ours"          # "ours", "fsdp2" (torch's fully_shard) or "collectives"
    steps: int = 3
    local_batch: int = 2           # sequences per rank per step (weak scaling: fixed)
    dtype: str = "fp32"            # compute dtype; masters are fp32
    impl: str = "gloo"             # collectives: "ring" (send/recv) or "gloo"
    prefetch: bool = True          # ZeRO-3: gather the next unit before this one computes
    alternate: bool = False        # ZeRO-3: prefetch on even steps only (paired rounds)
    slot_s: float | None = None    # emulated compute per block (engine.py); None: real
    params: bool = False           # return the final parameters
    lr: float = 1e-2
    world: int | None = None       # Nd: the job runs on ranks 0..world-1 (None: all of them)
    fail_at: int | None = None     # fault injection: rank 1 raises at this step
    loss_scale: float | None = None  # dynamic loss scaling from this scale (None: off)
    plant_at: int | None = None    # rank 1 plants an inf in one gradient element at this step
    label: str = ""
    numel: int = 0                 # "collectives": fp32 elements per timed buffer


def run_job(spec: ModelSpec, job: Job, group=None) -> dict:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = launch.device()  # this rank's GPU under NCCL, else the CPU
    model = build_model(spec).to(dev)
    comm = CommThread(group, impl=job.impl)
    scaler = LossScaler(job.loss_scale, growth_interval=1000) if job.loss_scale else None
    engine = ZeroEngine(model, job.stage, comm, compute_dtype=DTYPES[job.dtype], lr=job.lr,
                        prefetch=job.prefetch, slot_s=job.slot_s, scaler=scaler)
    out = {"losses": [], "bytes": [], "times": [], "spans": [], "comm": [], "memory": [],
           "sent": [], "skipped": []}
    for step in range(job.steps):
        tokens, targets = batch(spec, step, world * job.local_batch)
        rows = slice(rank * job.local_batch, (rank + 1) * job.local_batch)
        engine.spans.clear(), comm.spans.clear(), engine.memory.clear()
        dist.barrier(group)
        if job.alternate:
            engine.prefetch = step % 2 == 0
        if job.fail_at == step and rank == 1:
            raise RuntimeError(f"injected failure on rank 1 at step {step}")
        planted = None
        if job.plant_at == step and rank == 1:  # an overflow only rank 1 sees, in one element
            planted = model.layers[0].ffn.down_proj.weight.register_hook(
                lambda g: g.index_fill(1, torch.tensor([0], device=g.device), float("inf")))
        with comm_log.recording() as log:
            t0 = time.perf_counter()
            res = engine.step(loss_fn, tokens[rows].to(dev), targets[rows].to(dev))
            out["times"].append(time.perf_counter() - t0)
        out["sent"].append(log.bytes())  # bytes this rank put on the wire this step
        out["skipped"].append(res.skipped)
        if planted is not None:
            planted.remove()
        out["losses"].append(res.loss)
        out["bytes"].append(res.state_bytes)
        out["spans"].append([(k, u, a - t0, b - t0) for k, u, a, b in engine.spans])
        out["comm"].append([(s.op, s.unit, s.nbytes, s.start - t0, s.end - t0)
                            for s in comm.spans])
        out["memory"].append([(t - t0, b) for t, b in engine.memory])
    if job.params:
        out["params"] = {n: p.cpu() for n, p in engine.full_parameters().items()}
    comm.close()
    return out


def run_fsdp2(spec: ModelSpec, job: Job, group=None) -> dict:
    """The same training with torch's FSDP2: each block, then the root, `fully_shard`ed on a
    1-D device mesh of the group's ranks, and torch.optim.Adam on the sharded parameters."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    dev = launch.device()
    mesh = DeviceMesh(dev.type, ranks)
    model = build_model(spec).to(dev)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=job.lr,
                           foreach=False)
    out = {"losses": [], "times": []}
    for step in range(job.steps):
        tokens, targets = batch(spec, step, world * job.local_batch)
        rows = slice(rank * job.local_batch, (rank + 1) * job.local_batch)
        dist.barrier(group)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model, tokens[rows].to(dev), targets[rows].to(dev))
        loss.backward()
        opt.step()
        out["times"].append(time.perf_counter() - t0)
        out["losses"].append(float(loss.detach()))
    if job.params:
        out["params"] = {n: p.full_tensor().detach().cpu()
                         for n, p in model.named_parameters()}
    return out


def run_collectives(spec: ModelSpec, job: Job, group=None) -> dict:
    """Time reduce-scatters of one buffer of `job.numel` fp32 elements: our ring, gloo's
    reduce_scatter_single, and gloo's all-reduce of the same buffer, interleaved round by round
    (`job.steps` rounds after a warm-up), each round's time the slowest rank's."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flat = torch.randn(job.numel, generator=torch.Generator().manual_seed(rank))
    flat = flat.to(launch.device())
    out = torch.empty(job.numel // world, device=flat.device)
    ops = {"ring reduce-scatter": lambda: ring_reduce_scatter(out, list(flat.chunk(world)),
                                                              group),
           "gloo reduce-scatter": lambda: dist.reduce_scatter_single(out, flat, group=group),
           "gloo all-reduce": lambda: dist.all_reduce(flat.clone(), group=group)}
    times: dict[str, list[float]] = {k: [] for k in ops}
    for r in range(job.steps + 1):
        for name, op in ops.items():
            dist.barrier(group)
            t0 = time.perf_counter()
            op()
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            if r:  # round 0 warms up
                times[name].append(float(t))
    with comm_log.recording() as log:
        ring_reduce_scatter(out, list(flat.chunk(world)), group)
    return {"times": times, "ring_sent": log.bytes()}


def zero_worker(spec: ModelSpec, jobs: list[Job]) -> list[dict | None]:
    """Every job on this rank, in order (what launch.spawn runs). A job on Nd < world ranks
    runs in a subgroup of ranks 0..Nd-1; the other ranks skip it (None)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = sorted({job.world or world for job in jobs})
    if sizes[-1] > world:
        raise ValueError(f"a job asks for world={sizes[-1]} ranks; the run has {world}")
    # every rank creates every group, in the same order (new_group is collective)
    groups = {n: None if n == world else dist.new_group(list(range(n))) for n in sizes}
    runners = {"ours": run_job, "fsdp2": run_fsdp2, "collectives": run_collectives}
    return [runners[job.runtime](spec, job, groups[job.world or world])
            if rank < (job.world or world) else None for job in jobs]


def reference(spec: ModelSpec, steps: int, global_batch: int, lr: float = 1e-2,
              skip: tuple[int, ...] = ()) -> dict:
    """Single-process fp32 training on the whole global batch with torch.optim.Adam: the
    losses per step and the final parameters every stage must reproduce. Steps in `skip`
    are left out (an overflow skipped them)."""
    model = build_model(spec)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                           foreach=False)
    losses = []
    for step in range(steps):
        if step in skip:
            continue
        tokens, targets = batch(spec, step, global_batch)
        opt.zero_grad()
        loss = loss_fn(model, tokens, targets)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": losses,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def main(argv=None) -> None:
    """One job the torchrun way (spans nodes; NCCL when every rank has a GPU):
    ``python -m torch.distributed.run --standalone --nproc-per-node=4 -m
    shared.parallel.zero.worker --stage 3 --steps 5``."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--stage", type=int, default=3, choices=range(4))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--impl", default="ring", choices=["ring", "gloo"])
    args = ap.parse_args(argv)
    launch.init_from_env()
    try:
        job = Job(args.stage, steps=args.steps, dtype=args.dtype, impl=args.impl)
        (out,) = zero_worker(DEFAULT_SPEC, [job])
        if dist.get_rank() == 0:
            for i, (loss, t) in enumerate(zip(out["losses"], out["times"], strict=True)):
                print(f"step {i}: loss {loss:.4f} (rank 0)  {t * 1e3:.1f} ms  "
                      f"state bytes {out['bytes'][i]}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
