"""Run the tensor-parallel Llama on p ranks and the single-process one, the same batch for both.

`launch(jobs, world)` starts p processes through `shared.parallel.launch.spawn` (a port picked at
run time, a timeout on every collective and on the run, the first failing rank's traceback
raised in the parent) and runs every job in one process group, since starting processes costs
more than the jobs here:
- `Proof`: the shipped tiny Llama cut into p shards; one forward and backward on a batch of
  held-out bytes, each phase under its own log (shared.parallel.comm_log); back come the
  loss, the gathered logits, every local gradient with the slice of the full parameter it
  belongs to, the logs, and the bytes this rank holds (parameters; activations saved for the
  backward).
- `Timing`: a stack of TP blocks, paced (comm.Pacer) on a CPU, step times in paired rounds,
  and the all-reduce alone at the block's message size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shared.bench import one_thread
from shared.models import zoo
from shared.models.llama import Llama, LlamaConfig
from shared.parallel import comm_log
from shared.parallel.launch import device, init_from_env, spawn
from shared.parallel.memory.checkpointing import SavedBytes
from shared.parallel.tensor.comm import Pacer, TPComm
from shared.parallel.tensor.model import TPBlock, TPLlama


@dataclass(frozen=True)
class Proof:
    tokens: torch.Tensor   # [batch, seq] int64, the same on every rank
    targets: torch.Tensor  # [batch, seq]: tokens shifted by one
    tp: int | None = None  # tensor-parallel size (None: every rank); groups of consecutive ranks
    fail_rank: int = -1    # a rank that raises on purpose (to prove a failure ends the run)
    first_group_only = False  # every group runs it (data-parallel replicas)

    def execute(self, weights: dict, comm: TPComm) -> dict:
        return _proof(self, weights, comm)


@dataclass(frozen=True)
class Timing:
    config: LlamaConfig   # n_layers TP blocks of this shape (weights random, seeded)
    batch: int = 4
    seq: int = 64
    slot_s: float | None = 0.02   # emulated compute per segment (None: real compute)
    rounds: int = 5
    tp: int | None = None         # only the first group of this size runs; the others wait
    first_group_only = True

    def execute(self, weights: dict | None, comm: TPComm) -> dict:
        return _timing(self, comm)


def target_weights() -> dict:
    """The shipped target checkpoint: (config, float32 state dict). Read once in the parent
    and handed to the ranks (each would otherwise read and convert it again)."""
    ckpt = zoo.checkpoint("target")
    return {"config": LlamaConfig(**ckpt["recipe"]["model"]),
            "state": {k: v.float() for k, v in ckpt["state_dict"].items()}}


def build(weights: dict) -> Llama:
    """The single-process model, gradients on (zoo.load freezes it)."""
    model = Llama(weights["config"])
    model.load_state_dict(weights["state"])
    return model


def proof_job(batch: int, seq: int, seed: int, *, tp: int | None = None,
              fail_rank: int = -1) -> Proof:
    """`batch` windows of `seq` + 1 held-out bytes at seeded offsets: tokens and targets."""
    val = zoo.held_out_tokens("target")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(val) - seq - 1, (batch,), generator=gen)
    rows = torch.stack([val[s:s + seq + 1] for s in starts.tolist()])
    return Proof(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), tp, fail_rank)


def single_process(job: Proof, weights: dict, dtype: torch.dtype = torch.float32) -> dict:
    """The reference: the whole model in one process (in `dtype`: float64 gives the exact
    answer both fp32 runs are judged against), mean cross-entropy, every gradient."""
    model = build(weights).to(dtype)
    logits = model(job.tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), job.targets.flatten())
    loss.backward()
    return {"loss": loss.item(), "logits": logits.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters' storages (what this rank holds)."""
    return sum(p.untyped_storage().nbytes() for p in module.parameters())


def _proof(job: Proof, weights: dict, comm: TPComm) -> dict:
    if comm.rank == job.fail_rank:
        raise RuntimeError(f"rank {comm.rank} fails on purpose (fail_rank={job.fail_rank})")
    dev = device()  # this rank's GPU under NCCL, else the CPU
    model = TPLlama(build(weights), comm).to(dev)  # the full model is dropped once it is cut
    tokens, targets = job.tokens.to(dev), job.targets.to(dev)
    saved = SavedBytes(list(model.parameters()))
    with comm_log.recording() as fwd, saved:
        loss, logits = model.loss(tokens, targets)
    with comm_log.recording() as bwd:
        loss.backward()
    with comm_log.recording() as sync:
        model.sync_replicated_grads()
    return {"loss": loss.item(), "logits": comm.all_gather(logits.detach()).cpu(),
            "grads": {n: (p.shard, p.grad.cpu()) for n, p in model.named_parameters()},
            "forward": fwd, "backward": bwd, "sync": sync, "param_bytes": param_bytes(model),
            "activation_bytes": saved.peak, "tokens": tokens.numel()}


def timing_stack(job: Timing, comm: TPComm) -> tuple[list[TPBlock], torch.Tensor, torch.Tensor]:
    """The job's TP blocks (cut from a seeded single-process Llama), an input and an upstream
    gradient, identical on every rank."""
    torch.manual_seed(0)
    full = Llama(job.config)
    dev = device()
    blocks = [TPBlock(b, comm, f"layers.{i}").to(dev) for i, b in enumerate(full.layers)]
    x = torch.randn(job.batch, job.seq, job.config.dim)
    return blocks, x.to(dev), torch.randn_like(x).to(dev)


def _timing(job: Timing, comm: TPComm) -> dict:
    with one_thread():  # every p alike: one thread per rank (p = 1 runs in the parent)
        return _time_steps(job, comm)


def _time_steps(job: Timing, comm: TPComm) -> dict:
    blocks, x0, dy = timing_stack(job, comm)
    positions = torch.arange(job.seq, device=x0.device).expand(job.batch, job.seq)
    pacer = Pacer(job.slot_s) if job.slot_s else None
    comm.pacer = pacer
    cuda = x0.is_cuda

    def start() -> float:
        if cuda:
            torch.cuda.synchronize()
        if comm.world > 1:
            dist.barrier(group=comm.group)
        return time.perf_counter()

    def stop(t0: float) -> float:  # on a GPU: wall clock around a synchronized step
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def step() -> float:
        x = x0.clone().requires_grad_(True)
        t0 = start()
        if pacer:
            pacer.backward = False
            pacer.after()  # the first segment's slot starts now
        h = x
        for block in blocks:
            h = block(h, positions)
        if pacer:
            pacer.backward = True
        h.backward(dy)
        return stop(t0)

    step()  # warm-up
    if pacer:
        pacer.segments = pacer.overruns = 0
    times = [step() for _ in range(job.rounds)]
    comm.pacer = None
    overrun = pacer.overruns / pacer.segments if pacer else 0.0
    # The all-reduce alone, at one block's message size ([b, s, h] fp32), for the alpha-beta fit.
    ar = []
    for n in (job.batch * job.seq * job.config.dim, 1):
        buf = torch.randn(n, device=x0.device)
        comm.all_reduce(buf)  # warm-up
        for _ in range(2 * job.rounds):
            t0 = start()
            comm.all_reduce(buf)
            ar.append((4 * n, stop(t0)))
    return {"times": times, "allreduce": ar, "overrun": overrun}


def _run(jobs: list, weights: dict | None, comm: TPComm) -> list[dict]:
    return [job.execute(weights, comm) for job in jobs]


def tp_groups(tp: int) -> TPComm:
    """This rank's TPComm for groups of `tp` consecutive ranks (the whole world: the default
    group). Every rank creates every group, in the same order, as dist.new_group requires."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"tp={tp} must divide the world size {world}")
    if tp == world:
        return TPComm.from_default_group()
    groups = [dist.new_group(list(range(g * tp, (g + 1) * tp))) for g in range(world // tp)]
    return TPComm(rank % tp, tp, group=groups[rank // tp])


def worker(jobs: list, weights: dict | None) -> list[dict | None]:
    """One rank: every job in order (runs inside the process group spawn or torchrun set up).
    A job with `tp` smaller than the world runs on groups of tp ranks: a proof on every group
    (data-parallel replicas), a timing (`first_group_only`) on the first group only, the
    other ranks waiting. A job is any object with `tp`, `first_group_only` and
    `execute(weights, comm)` (Proof, Timing, torch_tp.TorchTP)."""
    world, comms, out = dist.get_world_size(), {}, []
    for job in jobs:
        tp = job.tp or world
        if tp not in comms:
            comms[tp] = tp_groups(tp)
        first = dist.get_rank() < tp
        out.append(_run([job], weights, comms[tp])[0]
                   if first or not job.first_group_only else None)
        dist.barrier()  # one job at a time on every rank (timings see no other job)
    return out


def launch(jobs: list, world: int, weights: dict | None = None, *,
           timeout_s: float = 300.0) -> list[list[dict]]:
    """Per job, the results of its first tensor-parallel group's ranks, in rank order; a
    failing rank raises RuntimeError with its error. Proof jobs need `weights`
    (target_weights())."""
    per_rank = spawn(worker, world, jobs, weights, timeout_s=timeout_s)
    return [[per_rank[r][j] for r in range(job.tp or world)] for j, job in enumerate(jobs)]


def in_process(jobs: list, weights: dict | None = None) -> list[dict]:
    """The same jobs at TP = 1 in this process (TPComm of one rank: nothing is sent)."""
    return _run(jobs, weights, TPComm(0, 1))


def assemble(ranks: list[dict], name: str, full: torch.Tensor) -> list[torch.Tensor]:
    """For one full parameter: each rank's (local grad, matching slice of `full`) pairs."""
    pairs = []
    for r in ranks:
        for shard, grad in r["grads"].values():
            if shard.name == name:
                pairs.append((grad, shard.of(full)))
    return pairs


def main(argv: list[str] | None = None) -> None:
    """Under torchrun: the proof on the whole world, e.g. ``python -m torch.distributed.run
    --standalone --nproc-per-node=4 -m shared.parallel.tensor.run``; rank 0 prints it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args(argv)
    init_from_env()
    weights = target_weights()
    job = proof_job(args.batch, args.seq, seed=0)
    out = worker([job], weights)[0]
    if dist.get_rank() == 0:
        ref = single_process(job, weights)
        print(f"tp={dist.get_world_size()}: loss {out['loss']:.6f} (one process "
              f"{ref['loss']:.6f}); all-reduces forward {out['forward'].count('all_reduce')}, "
              f"backward {out['backward'].count('all_reduce')}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
