"""The ecosystem's tensor parallelism on the same model and ranks: torch.distributed.tensor.
parallel (DTensor), for a side-by-side with ours.

`parallelize_module` with torch's per-module plan (ColwiseParallel on q/k/v and gate/up,
RowwiseParallel on o and down) shards the very same single-process Llama; the embedding and
the lm_head stay replicated (a vocab-parallel plan needs the loss parallel too). Each
ColwiseParallel all-reduces its own input's gradient in the backward, so a layer costs 2
all-reduces forward and 5 backward (q, k, v, gate, up), where Megatron's one f per group costs
2. torch's `CommDebugMode` counts them.

The job runs both on the first TP group, real compute (no emulation), alternating ours and
torch's training step round by round so drift hits both alike: the step-time ratio gets a
bootstrap interval (shared.bench.ratio) in the lab. The comparison measures whole training
steps (forward, loss, backward) of each implementation on the same gloo ranks, one thread each.
Heads must split evenly: torch's plan cuts k/v by output rows, so p must divide n_kv_heads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# DTensor's import loads triton: kernels must come first (it picks Triton's interpreter or not)
import kernels  # noqa: F401

# isort: split
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from shared.parallel.launch import device
from shared.parallel.tensor.comm import TPComm
from shared.parallel.tensor.model import TPLlama

PLAN = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(),
        "ffn.gate_proj": ColwiseParallel(), "ffn.up_proj": ColwiseParallel(),
        "ffn.down_proj": RowwiseParallel()}


def torch_tp_llama(model, comm: TPComm):
    """`model` (a single-process Llama) sharded in place by torch's plan over comm's group."""
    p, cfg = comm.world, model.config
    if cfg.n_heads % p or cfg.n_kv_heads % p:
        raise ValueError(f"torch's plan needs p={p} to divide n_heads={cfg.n_heads} and "
                         f"n_kv_heads={cfg.n_kv_heads}")
    kind = device().type
    mesh = (init_device_mesh(kind, (p,)) if comm.group is None
            else DeviceMesh.from_group(comm.group, kind))
    for block in model.layers:
        parallelize_module(block, mesh, PLAN)
        block.attn.n_heads //= p      # the local views reshape to this rank's heads
        block.attn.n_kv_heads //= p
    return model


@dataclass(frozen=True)
class TorchTP:
    tokens: torch.Tensor
    targets: torch.Tensor
    tp: int = 2
    rounds: int = 5
    first_group_only = True

    def execute(self, weights: dict, comm: TPComm) -> dict:
        from shared.parallel.tensor.run import build  # run imports this module's job type

        dev = device()
        ours = TPLlama(build(weights), comm).to(dev)
        theirs = torch_tp_llama(build(weights).to(dev), comm)
        tokens, targets = self.tokens.to(dev), self.targets.to(dev)

        def step_ours() -> float:
            loss, _ = ours.loss(tokens, targets)
            loss.backward()
            return loss.item()

        def step_torch() -> float:
            logits = theirs(tokens)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
            return loss.item()

        counter = CommDebugMode()
        with counter:
            loss_torch = step_torch()
        # copies: the timed steps below keep accumulating into .grad
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 .detach().cpu().clone() for n, p in theirs.named_parameters()}
        times: dict[str, list[float]] = {"ours": [], "torch": []}
        for _ in range(self.rounds + 1):  # the first round warms both up
            for name, fn in (("ours", step_ours), ("torch", step_torch)):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                dist.barrier(group=comm.group)
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        counts = {str(k).rsplit(".", 1)[-1]: v for k, v in counter.get_comm_counts().items()}
        return {"loss": loss_torch, "grads": grads, "comm_counts": counts,
                "times": {k: v[1:] for k, v in times.items()}}
